"""Recipe tables of hat-coco: datasets, transforms and the COCO metric."""

from __future__ import annotations

from typing import Literal

from hatcore.recipe import DatasetSpec, MetricSpec, TransformSpec, option, spec


@spec
class CocoSpec(DatasetSpec):
    """``type = "coco"``: a COCO instances JSON and its image folder."""

    ann_file: str = option(doc="COCO instances JSON (annotations/instances_val2017.json)")
    img_dir: str = option(doc="folder holding the images named by `file_name`")
    filter_empty: bool = option(True, doc="train split: skip images without boxes")


@spec
class ShapesSpec(DatasetSpec):
    """``type = "shapes"``: a generated COCO-format set of coloured shapes (the demo data, or
    the harder ``preset = "dense"`` benchmark set)."""

    root: str = option("tmp_data/shapes", doc="where {split}2017/ and annotations/ are written")
    num_images: int = option(512, doc="images generated for this split")
    image_size: int = option(320, doc="side of the square images in pixels")
    seed: int = option(0, doc="generator seed (the split is mixed in)")
    preset: Literal["demo", "dense"] = option(
        "demo", doc='"demo": 1-5 large distinct objects per image; "dense": 10-60 objects of '
        "8-48 px, occluding each other, among clutter on a busier texture (a set that is not "
        "saturated, for benchmarks)")
    filter_empty: bool = option(True, doc="train split: skip images without boxes")


@spec
class CocoLmdbSpec(DatasetSpec):
    """``type = "coco_lmdb"``: an LMDB written by `hat pack coco` (docs/lmdb.md)."""

    path: str = option(doc="the LMDB folder (D/val_lmdb)")
    source: DatasetSpec | None = option(
        None, doc="a coco/shapes table packed into `path` when `path` does not exist yet")
    filter_empty: bool = option(True, doc="train split: skip images without boxes")


@spec
class ResizeSpec(TransformSpec):
    img_scale: list[int] = option(factory=lambda: [512, 512], doc="target [h, w]")
    ratio_range: list[float] | None = option(
        None, doc="[lo, hi]: the target is multiplied by a random factor in this range")
    keep_ratio: bool = option(True, doc="fit inside the target keeping the aspect ratio")


@spec
class RandomCropSpec(TransformSpec):
    size: list[int] = option(factory=lambda: [512, 512], doc="crop [h, w] (smaller images kept)")


@spec
class PadSpec(TransformSpec):
    divisor: int = option(32, doc="pad bottom/right to a multiple of this")


@spec
class RandomFlipSpec(TransformSpec):
    px: float = option(0.5, doc="probability of a horizontal flip")
    py: float = option(0.0, doc="probability of a vertical flip")


@spec
class AugmentHsvSpec(TransformSpec):
    hgain: float = option(0.015, doc="hue gain (fraction of the hue circle)")
    sgain: float = option(0.7, doc="saturation gain")
    vgain: float = option(0.4, doc="value gain")


@spec
class MosaicSpec(TransformSpec):
    size: list[int] = option(
        factory=lambda: [512, 512], doc="[h, w] of each of the four quadrants; the canvas is "
        "twice that (follow with `resize` to size)")
    prob: float = option(1.0, doc="probability of a mosaic per sample")
    mixup_prob: float = option(0.0, doc="probability of blending the mosaic 0.5/0.5 with "
                               "another image (MixUp), keeping the boxes of both")
    off_last_epochs: int = option(
        0, doc="no mosaic (nor MixUp) in the last N epochs of the stage")
    min_box: float = option(2.0, doc="boxes cut to less than this many px on a side are dropped")


@spec
class ToTensorSpec(TransformSpec):
    to_yuv: bool = option(True, doc="convert RGB to YUV444 (BT.601 full range) as the BPU sees it")
    board_input: Literal["none", "nv12"] = option(
        "none", doc="nv12: pass the YUV image through the board's NV12 input conversion (4:2:0 "
        "chroma: 2x2 blocks averaged, then repeated; bit for bit as hat-bpu's align_bpu input "
        "path), so train, val and the board see the same pixels; needs to_yuv and an even size "
        "(pad before); none: full-resolution YUV444")


@spec
class NormalizeSpec(TransformSpec):
    mean: list[float] = option(factory=lambda: [128.0, 128.0, 128.0], doc="per-channel mean")
    std: list[float] = option(factory=lambda: [128.0, 128.0, 128.0], doc="per-channel std")


@spec
class CocoMetricSpec(MetricSpec):
    """``type = "coco"``: COCO bbox AP/AR (faster-coco-eval, else pycocotools)."""

    backend: Literal["auto", "faster_coco_eval", "pycocotools"] = option(
        "auto", doc="auto, faster_coco_eval or pycocotools")
    max_dets: int = option(100, doc="detections kept per image (highest scores)")
