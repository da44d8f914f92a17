"""``hat pack coco`` and ``hat infer``."""

from __future__ import annotations

from pathlib import Path

import click

from hatcore.context import HatContext, pass_hat
from hatcore.errors import UserError


@click.group("pack")
def pack_group() -> None:
    """Pack a dataset into a training-ready format."""


@pack_group.command("coco")
@click.option("--src-data-dir", required=True, type=click.Path(path_type=Path),
              help="COCO root: {split}2017/ and annotations/instances_{split}2017.json")
@click.option("--target-data-dir", required=True, type=click.Path(path_type=Path),
              help="where {split}_lmdb is written")
@click.option("--split-name", required=True, type=click.Choice(["train", "val"]))
@click.option("--pack-type", default="lmdb", type=click.Choice(["lmdb"]), show_default=True)
@click.option("--num-workers", default=0, show_default=True, help="reader processes")
@click.option("--strict", is_flag=True, help="fail on the first missing or corrupt image")
def pack_coco(src_data_dir: Path, target_data_dir: Path, split_name: str, pack_type: str,
              num_workers: int, strict: bool) -> None:
    """Pack a COCO-format split into TARGET/{split}_lmdb (resumable; see docs/lmdb.md)."""
    from hat_coco.datasets import load_coco_json, records_from_coco
    from hat_coco.lmdb_store import pack

    ann = src_data_dir / "annotations" / f"instances_{split_name}2017.json"
    img_dir = src_data_dir / f"{split_name}2017"
    if not img_dir.is_dir():
        raise UserError(f"{img_dir}: image folder not found (expected the COCO layout "
                        f"{split_name}2017/ and annotations/ under --src-data-dir)")
    data = load_coco_json(ann)
    target = target_data_dir / f"{split_name}_{pack_type}"
    meta = pack(records_from_coco(data, str(ann)), data["categories"], img_dir, target,
                source=str(ann), split=split_name, num_workers=num_workers, strict=strict)
    click.echo(f"{target}: {meta['count']} images packed, {len(meta['skipped'])} skipped")


@click.command("infer")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--image", "image", required=True, type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="PNG to write")
@click.option("--stage", default="float", show_default=True,
              help="float, calibration, qat, int_infer or align_bpu")
@click.option("--score-thr", default=0.3, show_default=True)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe value (TOML syntax; repeatable).")
@pass_hat
def infer_cmd(hat: HatContext, recipe: Path, image: Path, out: Path, stage: str,
              score_thr: float, overrides: tuple[str, ...]) -> None:
    """Detect objects in one image with a trained stage and draw them into a PNG."""
    from hat_coco.infer import infer_image

    n = infer_image(hat.load(recipe, overrides), image, out, stage, score_thr)
    click.echo(f"{out}: {n} detections drawn")
