"""``hat pack coco``, ``hat infer``, ``hat convert`` and ``hat data``."""

from __future__ import annotations

from pathlib import Path

import click

from hatcore.errors import UserError


@click.group("pack")
def pack_group() -> None:
    """Pack a dataset into a training-ready format."""


@pack_group.command("coco")
@click.option("--ann-file", type=click.Path(path_type=Path),
              help="the COCO instances JSON (any name, any place)")
@click.option("--img-dir", type=click.Path(path_type=Path),
              help="the folder its `file_name`s are relative to")
@click.option("--src-data-dir", type=click.Path(path_type=Path),
              help="shortcut for the COCO layout: {split}2017/ and "
                   "annotations/instances_{split}2017.json under this folder")
@click.option("--target-data-dir", required=True, type=click.Path(path_type=Path),
              help="where {split}_lmdb is written")
@click.option("--split-name", required=True,
              help="any name (train, val, test, mine ...); the LMDB is {split}_lmdb")
@click.option("--pack-type", default="lmdb", type=click.Choice(["lmdb"]), show_default=True)
@click.option("--num-workers", default=0, show_default=True, help="reader processes")
@click.option("--strict", is_flag=True, help="fail on the first missing or corrupt image")
def pack_coco(ann_file: Path | None, img_dir: Path | None, src_data_dir: Path | None,
              target_data_dir: Path, split_name: str, pack_type: str, num_workers: int,
              strict: bool) -> None:
    """Pack a COCO-format split into TARGET/{split}_lmdb (resumable; see docs/lmdb.md).

    Give --ann-file and --img-dir for any layout, or --src-data-dir for the COCO one.
    """
    from hat_coco.datasets import load_coco_json, records_from_coco
    from hat_coco.lmdb_store import pack

    ann, images = coco_inputs(ann_file, img_dir, src_data_dir, split_name)
    data = load_coco_json(ann)
    target = target_data_dir / f"{split_name}_{pack_type}"
    meta = pack(records_from_coco(data, str(ann)), data["categories"], images, target,
                source=str(ann), split=split_name, num_workers=num_workers, strict=strict)
    dropped = sum(meta["dropped"]["counts"].values())
    click.echo(f"{target}: {meta['count']} images packed, {len(meta['skipped'])} skipped, "
               f"{dropped} annotations the loader will drop, "
               f"{meta['size_mismatch']['count']} images whose size disagrees with the JSON")


def coco_inputs(ann_file: Path | None, img_dir: Path | None, src_data_dir: Path | None,
                split: str) -> tuple[Path, Path]:
    """The (annotation file, image folder) the pack options name; bad combinations refused."""
    if src_data_dir is not None:
        if ann_file is not None or img_dir is not None:
            raise UserError("give either --src-data-dir, or --ann-file and --img-dir, not both")
        ann_file = src_data_dir / "annotations" / f"instances_{split}2017.json"
        img_dir = src_data_dir / f"{split}2017"
        if not img_dir.is_dir():
            raise UserError(f"{img_dir}: image folder not found (--src-data-dir expects the COCO "
                            f"layout {split}2017/ and annotations/; for any other layout give "
                            f"--ann-file and --img-dir)")
        return ann_file, img_dir
    if ann_file is None or img_dir is None:
        raise UserError("give --ann-file and --img-dir (any layout), or --src-data-dir "
                        "(the COCO layout)")
    if not img_dir.is_dir():
        raise UserError(f"{img_dir}: --img-dir is not a folder")
    return ann_file, img_dir


@click.command("infer")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--image", "image", required=True, type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="PNG to write")
@click.option("--stage", default="float", show_default=True,
              help="float, calibration, qat, int_infer or align_bpu")
@click.option("--score-thr", default=0.3, show_default=True)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe value (TOML syntax; repeatable).")
def infer_cmd(recipe: Path, image: Path, out: Path, stage: str, score_thr: float,
              overrides: tuple[str, ...]) -> None:
    """Detect objects in one image with a trained stage and draw them into a PNG."""
    from hat_coco.infer import infer_image

    n = infer_image(recipe, image, out, stage, score_thr, overrides)
    click.echo(f"{out}: {n} detections drawn")


@click.group("convert")
def convert_group() -> None:
    """Convert YOLO or Pascal-VOC annotations to a COCO instances JSON (docs/coco.md)."""


def _written(out: Path, data: dict, counts: dict[str, int], img_dir: Path) -> None:
    from hat_coco.convert import write_json

    write_json(data, out)
    extra = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in counts.items()
                      if k not in ("images", "boxes"))
    click.echo(f"{out}: {counts['images']} images, {counts['boxes']} boxes, "
               f"{len(data['categories'])} categories ({extra})")
    click.echo(f"next: hat data check {out} --img-dir {img_dir}   then   hat pack coco "
               f"--ann-file {out} --img-dir {img_dir} --target-data-dir DIR --split-name NAME")


@convert_group.command("yolo")
@click.option("--img-dir", required=True, type=click.Path(path_type=Path),
              help="the images (searched recursively)")
@click.option("--label-dir", type=click.Path(path_type=Path),
              help="the .txt labels, same relative paths as the images [default: the image "
                   "folder with its last `images` component turned into `labels`, else the "
                   "image folder itself]")
@click.option("--classes", "classes", required=True, type=click.Path(path_type=Path),
              help="class names, one per line, in class-index order (classes.txt, obj.names)")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="COCO JSON to write")
def convert_yolo(img_dir: Path, label_dir: Path | None, classes: Path, out: Path) -> None:
    """YOLO txt labels (class cx cy w h, normalised) -> COCO JSON; category id = class + 1."""
    from hat_coco.convert import read_class_names, yolo_to_coco

    data, counts = yolo_to_coco(img_dir, read_class_names(classes), label_dir)
    _written(out, data, counts, img_dir)


@convert_group.command("voc")
@click.option("--ann-dir", required=True, type=click.Path(path_type=Path),
              help="the XML files (VOC's Annotations/)")
@click.option("--img-dir", required=True, type=click.Path(path_type=Path),
              help="the images their <filename> names (VOC's JPEGImages/)")
@click.option("--image-set", type=click.Path(path_type=Path),
              help="only the ids this list names (VOC's ImageSets/Main/val.txt) [default: "
                   "every .xml]")
@click.option("--classes", "classes", type=click.Path(path_type=Path),
              help="class names, one per line (their order gives the ids) [default: the names "
                   "found, sorted]")
@click.option("--difficult", default="ignore", show_default=True,
              type=click.Choice(["ignore", "keep", "drop"]),
              help="difficult objects: ignore (iscrowd = 1: not scored, as in VOC), keep, drop")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="COCO JSON to write")
def convert_voc(ann_dir: Path, img_dir: Path, image_set: Path | None, classes: Path | None,
                difficult: str, out: Path) -> None:
    """Pascal-VOC XML -> COCO JSON (1-based inclusive pixel boxes -> COCO xywh)."""
    from hat_coco.convert import read_class_names, voc_to_coco

    names = read_class_names(classes) if classes is not None else None
    data, counts = voc_to_coco(ann_dir, img_dir, names, image_set, difficult)
    _written(out, data, counts, img_dir)


@click.group("data")
def data_group() -> None:
    """Look at a dataset: what it holds, what is wrong with it, its boxes drawn."""


@data_group.command("check")
@click.argument("target", type=click.Path(path_type=Path), metavar="RECIPE|LMDB|COCO-JSON")
@click.option("--img-dir", type=click.Path(path_type=Path),
              help="COCO-JSON: the image folder (default: the COCO layout's, when present; "
                   "without one only the annotations are checked)")
@click.option("--strict", is_flag=True, help="exit with status 2 when there is any error")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="RECIPE: override a recipe value (TOML syntax; repeatable).")
def data_check(target: Path, img_dir: Path | None, strict: bool, as_json: bool,
               overrides: tuple[str, ...]) -> None:
    """Images, boxes per class, box sizes, and every annotation the loader would drop."""
    import json
    import sys

    from hat_coco import datacheck as dc

    progress = sys.stderr.isatty() and not as_json
    if (target / "data.mdb").is_file():
        reports = [dc.check_lmdb(target, progress)]
    elif target.suffix == ".json":
        reports = [dc.check_json(target, img_dir or dc.guess_img_dir(target), progress)]
    elif target.suffix == ".toml":
        from hat_coco.recipe_data import recipe_datasets

        reports = [dc.check_dataset(ds, f"[data.{split}]", progress)
                   for split, ds in recipe_datasets(target, overrides).items()]
    elif not target.exists():
        raise UserError(f"{target}: no such file or folder")
    else:
        raise UserError(f"{target}: expected a recipe (.toml), an LMDB folder (with data.mdb) "
                        f"or a COCO JSON (.json)")
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in reports], indent=2))
    else:
        click.echo("\n\n".join(dc.format_report(r) for r in reports))
    errors = sum(r.n_errors for r in reports)
    if strict and errors:
        raise UserError(f"{target}: {errors} error(s) in the data (--strict)")


@data_group.command("browse")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--split", default="val", show_default=True, help="train or val")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="folder for the PNGs")
@click.option("-n", "n", default=16, show_default=True, help="images drawn (the first N)")
@click.option("--raw", is_flag=True, help="the decoded image, before the recipe's transforms")
@click.option("--seed", default=0, show_default=True, help="seed of random transforms")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe value (TOML syntax; repeatable).")
def data_browse(recipe: Path, split: str, out: Path, n: int, raw: bool, seed: int,
                overrides: tuple[str, ...]) -> None:
    """Draw the ground truth (class names) of a recipe split, as the model sees it or --raw."""
    from hat_coco.browse import browse
    from hat_coco.recipe_data import recipe_datasets

    datasets = recipe_datasets(recipe, overrides, (split,))
    if split not in datasets:
        raise UserError(f"{recipe}: the recipe has no [data.{split}] table")
    written = browse(datasets[split], out, n, raw, seed)
    how = "raw" if raw else "after the recipe's transforms"
    click.echo(f"{out}: {len(written)} images of {split} with their ground truth ({how})")
