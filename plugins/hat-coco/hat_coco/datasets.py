"""Detection datasets over COCO-format annotations: the JSON + folder one and the shared base.

Every dataset exposes ``class_names`` (label -> name), ``cat_ids`` (label -> COCO category id),
``coco_gt()`` (a COCO-format ground-truth dict for the metric) and ``collate_fn``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hat_coco.decode import DecodeError, decode_rgb
from hat_coco.transforms import collate
from hatcore.errors import UserError

Transform = Callable[[dict[str, Any]], dict[str, Any]]

DROP_REASONS = {
    "unknown_category": "its category_id is not in `categories`",
    "empty_box": "its width or height is zero or negative",
    "outside_image": "no part of it lies inside the image",
}
"""Why the loader leaves an annotation out of the training targets (crowd boxes aside: they
are left out on purpose and kept for the metric). The packer counts these, `hat data check`
lists them."""

EXAMPLES_KEPT = 5
"""Examples of each kind of problem kept in reports and in the LMDB meta record."""


def drop_reason(box: list[float], category_id: int, known: set[int] | dict[int, int],
                height: float, width: float) -> str | None:
    """Why one COCO annotation (``box`` xywh) is dropped on an image of ``height`` x ``width``,
    as a key of ``DROP_REASONS``; None when it is kept."""
    x, y, w, h = box
    if category_id not in known:
        return "unknown_category"
    if not (w > 0 and h > 0):  # also catches NaN
        return "empty_box"
    if x >= width or y >= height or x + w <= 0 or y + h <= 0:
        return "outside_image"
    return None


def dropped_annotations(records: list[dict[str, Any]], categories: list[dict[str, Any]],
                        keep: int = EXAMPLES_KEPT) -> dict[str, Any]:
    """What the loader will drop from ``records`` (sizes from the records' height/width).

    :returns: ``{"counts": {reason: n}, "examples": [{"reason", "image_id", "file_name",
        "ann_id", "category_id", "bbox"}, ...]}`` with at most ``keep`` examples per reason.
    """
    known = {int(c["id"]) for c in categories}
    counts = dict.fromkeys(DROP_REASONS, 0)
    examples: list[dict[str, Any]] = []
    for r in records:
        for aid, box, cid in zip(r["ann_ids"], r["bboxes"], r["category_ids"], strict=True):
            why = drop_reason(box, cid, known, r["height"], r["width"])
            if why is None:
                continue
            counts[why] += 1
            if counts[why] <= keep:
                examples.append({"reason": why, "image_id": r["image_id"],
                                 "file_name": r["file_name"], "ann_id": aid,
                                 "category_id": cid, "bbox": list(box)})
    return {"counts": counts, "examples": examples}


def describe_drops(drops: dict[str, Any]) -> list[str]:
    """Readable lines for ``dropped_annotations``'s result (empty when nothing is dropped)."""
    lines = []
    for why, n in drops["counts"].items():
        if n:
            lines.append(f"{n} annotation(s) dropped: {DROP_REASONS[why]}")
            lines += [f"  e.g. annotation {e['ann_id']} of image {e['image_id']} "
                      f"({e['file_name']}): category_id {e['category_id']}, bbox {e['bbox']}"
                      for e in drops["examples"] if e["reason"] == why]
    return lines


def records_from_coco(data: dict[str, Any], source: str) -> list[dict[str, Any]]:
    """A COCO instances dict -> one record per image (the LMDB record layout, docs/lmdb.md).

    Each record: ``image_id, file_name, height, width, ann_ids, bboxes`` (COCO xywh),
    ``category_ids, iscrowd, areas``.
    """
    try:
        images: dict[int, dict[str, Any]] = {}
        for im in data["images"]:
            if im["id"] in images:
                raise UserError(f"{source}: image id {im['id']} appears twice in `images` "
                                f"({images[im['id']]['file_name']}, {im['file_name']}); "
                                f"`hat data check {source}` lists every problem")
            images[im["id"]] = im
        recs = {i: {"image_id": i, "file_name": im["file_name"], "height": im["height"],
                    "width": im["width"], "ann_ids": [], "bboxes": [], "category_ids": [],
                    "iscrowd": [], "areas": []} for i, im in images.items()}
        for ann in data.get("annotations", []):
            r = recs.get(ann["image_id"])
            if r is None:
                raise UserError(f"{source}: annotation {ann.get('id')} refers to image "
                                f"{ann['image_id']}, which is not in `images`")
            x, y, w, h = (float(v) for v in ann["bbox"])
            r["ann_ids"].append(int(ann["id"]))
            r["bboxes"].append([x, y, w, h])
            r["category_ids"].append(int(ann["category_id"]))
            r["iscrowd"].append(int(ann.get("iscrowd", 0)))
            r["areas"].append(float(ann.get("area", w * h)))
    except KeyError as exc:
        raise UserError(f"{source}: not a COCO instances file (missing key {exc})") from None
    return [recs[i] for i in sorted(recs)]


class DetectionDataset(torch.utils.data.Dataset):
    """Base: records + categories in, transformed samples out. Subclasses give ``load_bytes``."""

    def __init__(self, records: list[dict[str, Any]], categories: list[dict[str, Any]],
                 transforms: list[Transform], *, skip_empty: bool = False) -> None:
        self.categories = sorted(categories, key=lambda c: c["id"])
        self.cat_ids: list[int] = [c["id"] for c in self.categories]
        self.class_names: list[str] = [c["name"] for c in self.categories]
        self._label = {cid: i for i, cid in enumerate(self.cat_ids)}
        self.all_records = records
        self.records = [r for r in records
                        if not skip_empty or any(c == 0 for c in r["iscrowd"])]
        self.transforms = transforms
        self.collate_fn = collate

    def __len__(self) -> int:
        return len(self.records)

    def load_bytes(self, index: int) -> bytes:
        raise NotImplementedError

    def source(self, index: int) -> dict[str, str]:
        """Where the original image is (kept in ``meta["source"]`` for drawing)."""
        raise NotImplementedError

    def raw_sample(self, index: int) -> dict[str, Any]:
        """The decoded, untransformed sample (see hat_coco.transforms for the layout)."""
        rec = self.records[index]
        try:
            img = decode_rgb(self.load_bytes(index))
        except DecodeError as exc:
            raise UserError(f"{self.describe(index)}: {exc}") from None
        return make_sample(img, rec, self._label, self.source(index))

    def describe(self, index: int) -> str:
        return str(self.source(index))

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.raw_sample(index)
        for t in self.transforms:
            sample = t(sample)
        return sample

    def coco_gt(self) -> dict[str, Any]:
        """The ground truth as a COCO instances dict (every image of the dataset)."""
        images, anns = [], []
        for r in self.all_records:
            images.append({"id": r["image_id"], "file_name": r["file_name"],
                           "height": r["height"], "width": r["width"]})
            for aid, box, cid, crowd, area in zip(r["ann_ids"], r["bboxes"], r["category_ids"],
                                                  r["iscrowd"], r["areas"], strict=True):
                anns.append({"id": aid, "image_id": r["image_id"], "bbox": list(box),
                             "category_id": cid, "iscrowd": crowd, "area": area})
        return {"images": images, "annotations": anns, "categories": self.categories}


def make_sample(img: np.ndarray, rec: dict[str, Any], label_of: dict[int, int],
                source: dict[str, str]) -> dict[str, Any]:
    """A record and its decoded image -> a sample. Crowd boxes and the annotations
    ``drop_reason`` names are left out; boxes partly outside the image are clipped to it."""
    h0, w0 = img.shape[:2]
    boxes, labels = [], []
    for box, cid, crowd in zip(rec["bboxes"], rec["category_ids"], rec["iscrowd"], strict=True):
        if crowd or drop_reason(box, cid, label_of, h0, w0) is not None:
            continue
        x, y, w, h = box
        boxes.append([max(x, 0.0), max(y, 0.0), min(x + w, w0), min(y + h, h0)])
        labels.append(label_of[cid])
    meta = {"image_id": rec["image_id"], "file_name": rec["file_name"], "orig_size": (h0, w0),
            "img_shape": (h0, w0), "pad_shape": (h0, w0), "scale": (1.0, 1.0), "flip": False,
            "source": source}
    return {"img": img, "gt_boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
            "gt_labels": np.asarray(labels, np.int64), "meta": meta}


def load_coco_json(ann_file: Path) -> dict[str, Any]:
    if not ann_file.is_file():
        raise UserError(f"{ann_file}: annotation file not found")
    try:
        data = json.loads(ann_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{ann_file}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or "categories" not in data or "images" not in data:
        raise UserError(f"{ann_file}: not a COCO instances file (needs images and categories)")
    return data


class CocoDataset(DetectionDataset):
    """A COCO instances JSON and its image folder."""

    def __init__(self, ann_file: str | Path, img_dir: str | Path, transforms: list[Transform],
                 *, skip_empty: bool = False) -> None:
        self.ann_file, self.img_dir = Path(ann_file), Path(img_dir)
        data = load_coco_json(self.ann_file)
        super().__init__(records_from_coco(data, str(self.ann_file)), data["categories"],
                         transforms, skip_empty=skip_empty)

    def path(self, index: int) -> Path:
        return self.img_dir / self.records[index]["file_name"]

    def load_bytes(self, index: int) -> bytes:
        try:
            return self.path(index).read_bytes()
        except OSError as exc:
            raise UserError(f"{self.path(index)}: cannot read the image ({exc.strerror})") from None

    def source(self, index: int) -> dict[str, str]:
        return {"path": str(self.path(index))}

    def describe(self, index: int) -> str:
        return str(self.path(index))
