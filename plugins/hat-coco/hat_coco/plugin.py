"""hat-coco's hook implementations: COCO/LMDB/shapes datasets, transforms, metric, commands."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from hat_coco import specs as S
from hat_coco import transforms as T
from hatcore import hookimpl
from hatcore.errors import UserError
from hatcore.recipe import DatasetSpec, MetricSpec, TransformSpec
from hatcore.registry import Register

_TRANSFORMS: dict[type, tuple[str, Callable[[Any], Any], str]] = {
    S.ResizeSpec: ("resize", lambda s: T.Resize(s.img_scale, s.ratio_range, s.keep_ratio),
                   "resize to img_scale [h, w] (random ratio, keep ratio)"),
    S.RandomCropSpec: ("random_crop", lambda s: T.RandomCrop(s.size),
                       "random crop; boxes clipped, empty ones dropped"),
    S.PadSpec: ("pad", lambda s: T.Pad(s.divisor), "pad bottom/right to a multiple of divisor"),
    S.RandomFlipSpec: ("random_flip", lambda s: T.RandomFlip(s.px, s.py),
                       "random horizontal/vertical flip"),
    S.AugmentHsvSpec: ("augment_hsv", lambda s: T.AugmentHSV(s.hgain, s.sgain, s.vgain),
                       "random hue/saturation/value gains"),
    S.MosaicSpec: ("mosaic", lambda s: T.Mosaic(s.size, s.prob, s.mixup_prob, s.off_last_epochs,
                                                s.min_box),
                   "mosaic of four images (+ MixUp); first in the list, train split"),
    S.ToTensorSpec: ("to_tensor", lambda s: T.ToTensor(s.to_yuv, s.board_input),
                     "HWC uint8 -> CHW float tensor (YUV444 BT.601 when to_yuv; the board's "
                     "NV12 round trip with board_input)"),
    S.NormalizeSpec: ("normalize", lambda s: T.Normalize(s.mean, s.std), "(img - mean) / std"),
}


@hookimpl
def hat_components(register: Register) -> None:
    register("dataset", "coco", S.CocoSpec, "COCO instances JSON + image folder")
    register("dataset", "coco_lmdb", S.CocoLmdbSpec, "LMDB written by `hat pack coco`")
    register("dataset", "shapes", S.ShapesSpec, "generated COCO-format shapes (demo data)")
    for cls, (name, _, doc) in _TRANSFORMS.items():
        register("transform", name, cls, doc)
    register("metric", "coco", S.CocoMetricSpec, "COCO bbox AP/AR", default=True)


def dataset_from_spec(spec: DatasetSpec, split: str, transforms: list[Any]) -> Any:
    """The dataset a hat-coco table describes, or None for another plugin's table."""
    from hat_coco.datasets import CocoDataset

    skip_empty = split == "train" and getattr(spec, "filter_empty", False)
    if isinstance(spec, S.CocoSpec):
        return CocoDataset(spec.ann_file, spec.img_dir, transforms, skip_empty=skip_empty)
    if isinstance(spec, S.ShapesSpec):
        from hat_coco.shapes import generate

        ann = generate(spec.root, split, spec.num_images, spec.image_size, spec.seed,
                       spec.preset)
        return CocoDataset(ann, Path(spec.root) / f"{split}2017", transforms,
                           skip_empty=skip_empty)
    if isinstance(spec, S.CocoLmdbSpec):
        from hat_coco.lmdb_store import CocoLmdbDataset, pack_dataset

        path = Path(spec.path)
        if spec.source is not None:
            from hat_coco.locking import file_lock

            with file_lock(path.parent / f".{path.name}.lock"):  # one rank packs, others wait
                if not path.exists() or not _pack_complete(path):
                    src = dataset_from_spec(spec.source, split, [])
                    if src is None:
                        raise UserError(f"coco_lmdb.source: type {spec.source.type!r} cannot be "
                                        f"packed (use coco or shapes)")
                    pack_dataset(src, path)
        elif not path.exists():
            raise UserError(f"{path}: no such LMDB; pack one with `hat pack coco` or give the "
                            f"coco_lmdb table a `source` to pack from")
        return CocoLmdbDataset(spec.path, transforms, skip_empty=skip_empty)
    return None


def _pack_complete(path: Path) -> bool:
    from hat_coco.lmdb_store import open_readonly, read_meta

    if not (path / "data.mdb").is_file():
        return False
    meta = read_meta(open_readonly(path), path)
    return bool(meta and meta.get("complete"))


@hookimpl
def build_dataset(spec: DatasetSpec, split: str, transforms: list[Any]) -> Any:
    dataset = dataset_from_spec(spec, split, transforms)
    for t in transforms if dataset is not None else []:
        if hasattr(t, "bind"):  # dataset-level transforms (mosaic) draw other images from it
            t.bind(dataset)
    return dataset


@hookimpl
def build_transform(spec: TransformSpec) -> Any:
    entry = _TRANSFORMS.get(type(spec))
    return None if entry is None else entry[1](spec)


@hookimpl
def register_commands(cli: Any) -> None:
    from hat_coco.commands import (
        convert_group,
        data_browse,
        data_check,
        data_group,
        infer_cmd,
        pack_coco,
        pack_group,
    )

    _add_to_group(cli, pack_group, [pack_coco])
    _add_to_group(cli, convert_group, [])
    _add_to_group(cli, data_group, [data_check, data_browse])
    if "infer" not in cli.commands:
        cli.add_command(infer_cmd)


def _add_to_group(cli: Any, group: Any, commands: list[Any]) -> None:
    """Add ``group``, or its ``commands`` to a group of that name another plugin added."""
    existing = cli.commands.get(group.name)
    if existing is not None and existing is not group and hasattr(existing, "add_command"):
        for cmd in commands or list(group.commands.values()):
            existing.add_command(cmd)
    else:
        cli.add_command(group)


@hookimpl
def describe_file(path: Path) -> str | None:
    from hat_coco.lmdb_store import describe_lmdb

    return describe_lmdb(Path(path))


@hookimpl
def build_metric(spec: MetricSpec, dataset: Any) -> Any:
    if isinstance(spec, S.CocoMetricSpec):
        from hat_coco.metric import CocoMetric

        return CocoMetric(dataset, spec.backend, spec.max_dets)
    return None


@hookimpl
def draw_detections(batch: Any, detections: list[Any], class_names: list[str],
                    paths: list[Path], score_thr: float) -> bool | None:
    from hat_coco.draw import draw_batch

    return draw_batch(batch, detections, class_names, paths, score_thr)


@hookimpl
def draw_comparison(dataset: Any, detections: dict[str, list[dict[str, Any]]], out_dir: Path,
                    n: int, score_thr: float) -> list[Path] | None:
    from hat_coco.compare import compare_stages
    from hat_coco.datasets import DetectionDataset

    if not isinstance(dataset, DetectionDataset):
        return None
    return compare_stages(dataset, detections, out_dir, n=n, score_thr=score_thr, suffix=".jpg")


@hookimpl
def report_sections(work_dir: Path, summary: dict[str, Any]) -> list[Any]:
    from hat_coco.report import sections

    return sections(work_dir, summary)
