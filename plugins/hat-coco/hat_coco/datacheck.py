"""``hat data check``: what a COCO JSON, an LMDB or a recipe's data holds, and what is wrong.

One checker, :func:`check_coco`, reads a COCO instances dict and (optionally) each image's
bytes; the LMDB and recipe forms turn their data into that dict and a byte loader.
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hat_coco.datasets import DROP_REASONS, EXAMPLES_KEPT, drop_reason
from hat_coco.decode import DecodeError, decode_stored, exif_orientation

ERRORS = {
    **DROP_REASONS,
    "bad_annotation": "it is not a COCO annotation (needs id, image_id, category_id and a "
                      "4-number bbox)",
    "orphan_annotation": "its image_id is not in `images`",
    "duplicate_image_id": "the image id appears more than once in `images`",
    "duplicate_ann_id": "the annotation id appears more than once",
    "missing_image": "the image file (or LMDB record) is missing or unreadable",
    "corrupt_image": "the image bytes do not decode",
    "size_mismatch": "the image's size (as displayed) disagrees with the JSON's height/width",
}
WARNINGS = {
    "partly_outside": "the box reaches more than 1 px outside the image (clipped when loaded)",
    "duplicate_file_name": "two images share one file_name",
    "exif_rotated": "the image carries an EXIF rotation; it is decoded turned, and its boxes "
                    "are expected in the turned (displayed) orientation",
}
SIZE_BINS = (8, 16, 32, 64, 96, 128, 256, 512)
"""Edges of the sqrt(area) histogram in pixels (32 and 96 are COCO's small/medium/large)."""


class Report:
    """Counts and a few examples per kind of finding."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.stats: dict[str, Any] = {}
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, kind: str, example: str) -> None:
        self.counts[kind] += 1
        kept = self.examples.setdefault(kind, [])
        if len(kept) < EXAMPLES_KEPT:
            kept.append(example)

    @property
    def n_errors(self) -> int:
        return sum(n for k, n in self.counts.items() if k in ERRORS)

    def as_dict(self) -> dict[str, Any]:
        def part(table: dict[str, str]) -> dict[str, Any]:
            return {k: {"count": self.counts[k], "why": table[k], "examples": self.examples[k]}
                    for k in table if self.counts[k]}

        return {"source": self.source, **self.stats, "errors": part(ERRORS),
                "warnings": part(WARNINGS)}


def check_coco(data: dict[str, Any], source: str,
               load: Callable[[dict[str, Any]], bytes | None] | None = None,
               progress: bool = False) -> Report:
    """Check a COCO instances dict; with ``load`` (image entry -> bytes or None when missing)
    also every image: decodable, its displayed size equal to the JSON's, EXIF rotation."""
    rep = Report(source)
    cats = {c.get("id"): c.get("name", str(c.get("id"))) for c in data.get("categories", [])}
    images: dict[Any, dict[str, Any]] = {}
    names: set[str] = set()
    for im in data.get("images", []):
        if im.get("id") in images:
            rep.add("duplicate_image_id", f"image id {im.get('id')}: "
                                          f"{images[im['id']].get('file_name')}, {im.get('file_name')}")
            continue
        images[im.get("id")] = im
        if im.get("file_name") in names:
            rep.add("duplicate_file_name", str(im.get("file_name")))
        names.add(im.get("file_name"))
    per_class: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    hist = [0] * (len(SIZE_BINS) + 1)
    ann_ids: set[Any] = set()
    with_boxes: set[Any] = set()
    crowd = 0
    for ann in data.get("annotations", []):
        box = ann.get("bbox")
        if not (isinstance(ann, dict) and {"id", "image_id", "category_id"} <= ann.keys()
                and isinstance(box, list) and len(box) == 4
                and all(isinstance(v, int | float) for v in box)):
            rep.add("bad_annotation", str(ann)[:160])
            continue
        where = f"annotation {ann['id']} of image {ann['image_id']}"
        if ann["id"] in ann_ids:
            rep.add("duplicate_ann_id", where)
        ann_ids.add(ann["id"])
        im = images.get(ann["image_id"])
        if im is None:
            rep.add("orphan_annotation", where)
            continue
        where += f" ({im.get('file_name')}): category_id {ann['category_id']}, bbox {box}"
        h, w = im.get("height", 0), im.get("width", 0)
        why = drop_reason(box, ann["category_id"], cats, h, w)
        if why is not None:
            rep.add(why, where)
            continue
        x, y, bw, bh = box
        if x < -1 or y < -1 or x + bw > w + 1 or y + bh > h + 1:
            rep.add("partly_outside", where)
        if ann.get("iscrowd", 0):
            crowd += 1
            continue
        with_boxes.add(ann["image_id"])
        per_class[cats[ann["category_id"]]] += 1
        area = float(ann.get("area", bw * bh))
        sizes["small" if area < 32**2 else "medium" if area < 96**2 else "large"] += 1
        hist[sum(math.sqrt(max(area, 0.0)) >= e for e in SIZE_BINS)] += 1
    rep.stats = {
        "images": len(images), "annotations": len(data.get("annotations", [])),
        "categories": len(cats), "crowd": crowd,
        "images_without_boxes": len(images) - len(with_boxes),
        "boxes_per_class": {name: per_class[name] for name in cats.values()},
        "box_sizes": {k: sizes[k] for k in ("small", "medium", "large")},
        "sqrt_area_histogram": dict(zip(_bin_names(), hist, strict=True)),
        "images_checked": load is not None,
    }
    if load is not None:
        _check_images(rep, list(images.values()), load, progress)
    return rep


def _bin_names() -> list[str]:
    edges = ("0",) + tuple(str(e) for e in SIZE_BINS)
    return [f"{a}-{b}" for a, b in zip(edges, edges[1:], strict=False)] + [f">={SIZE_BINS[-1]}"]


def _check_images(rep: Report, images: list[dict[str, Any]],
                  load: Callable[[dict[str, Any]], bytes | None], progress: bool) -> None:
    from tqdm import tqdm

    for im in tqdm(images, unit="img", desc="check images", disable=not progress,
                   file=sys.stderr):
        name = str(im.get("file_name"))
        data = load(im)
        if data is None:
            rep.add("missing_image", name)
            continue
        try:
            sh, sw = decode_stored(data).shape[:2]
        except DecodeError as exc:
            rep.add("corrupt_image", f"{name}: {exc}")
            continue
        orientation = exif_orientation(data)
        turned = orientation in (5, 6, 7, 8)
        shown = (sw, sh) if turned else (sh, sw)
        if orientation != 1:
            rep.add("exif_rotated", f"{name}: orientation {orientation}")
        json_size = (im.get("height"), im.get("width"))
        if json_size != shown:
            hint = (" — the JSON has the stored (unrotated) size: the boxes were probably drawn "
                    "on the unrotated image" if turned and json_size == (sh, sw) else "")
            rep.add("size_mismatch", f"{name}: JSON {json_size[0]}x{json_size[1]} (h x w), "
                                     f"image {shown[0]}x{shown[1]}{hint}")


def folder_loader(img_dir: Path) -> Callable[[dict[str, Any]], bytes | None]:
    def load(im: dict[str, Any]) -> bytes | None:
        try:
            return (img_dir / str(im.get("file_name"))).read_bytes()
        except OSError:
            return None
    return load


def check_json(ann_file: Path, img_dir: Path | None, progress: bool = False) -> Report:
    """Check a COCO JSON; its images too when ``img_dir`` is given."""
    from hat_coco.datasets import load_coco_json

    data = load_coco_json(ann_file)
    source = f"{ann_file}" + (f" (images in {img_dir})" if img_dir else " (images not checked)")
    return check_coco(data, source, folder_loader(img_dir) if img_dir else None, progress)


def guess_img_dir(ann_file: Path) -> Path | None:
    """The COCO layout's image folder for ``annotations/instances_{split}.json``, if present."""
    stem = ann_file.stem
    if ann_file.parent.name == "annotations" and stem.startswith("instances_"):
        candidate = ann_file.parent.parent / stem.removeprefix("instances_")
        if candidate.is_dir():
            return candidate
    return None


def check_lmdb(path: Path, progress: bool = False) -> Report:
    """Check an LMDB by `hat pack coco` (its records and image bytes)."""
    from hat_coco.lmdb_store import CocoLmdbDataset, img_key, open_readonly

    ds = CocoLmdbDataset(path, [])

    def load(im: dict[str, Any]) -> bytes | None:
        with open_readonly(path).begin(buffers=False) as txn:
            return txn.get(img_key(im["id"]))

    rep = check_coco(ds.coco_gt(), f"{path} (LMDB)", load, progress)
    if ds.meta.get("skipped"):
        rep.stats["skipped_when_packed"] = list(ds.meta["skipped"])
    return rep


def check_dataset(dataset: Any, label: str, progress: bool = False) -> Report:
    """Check a recipe's hat-coco dataset (folder-backed or LMDB)."""
    from hat_coco.datasets import CocoDataset
    from hat_coco.lmdb_store import CocoLmdbDataset

    if isinstance(dataset, CocoLmdbDataset):
        rep = check_lmdb(dataset.path, progress)
    elif isinstance(dataset, CocoDataset):
        rep = check_json(dataset.ann_file, dataset.img_dir, progress)
    else:
        from hatcore.errors import UserError

        raise UserError(f"{label}: `hat data check` reads hat-coco datasets (coco, coco_lmdb, "
                        f"shapes), not {type(dataset).__name__}")
    rep.source = f"{label}: {rep.source}"
    return rep


def format_report(rep: Report) -> str:
    """The report as text, for the terminal."""
    d = rep.as_dict()
    out = [d["source"],
           f"  images: {d['images']} ({d['images_without_boxes']} without boxes), annotations: "
           f"{d['annotations']} ({d['crowd']} crowd), categories: {d['categories']}",
           "  boxes per class:"]
    width = max((len(n) for n in d["boxes_per_class"]), default=0)
    out += [f"    {name:<{width}}  {n}" for name, n in d["boxes_per_class"].items()]
    total = max(1, sum(d["box_sizes"].values()))
    out.append("  box sizes (COCO: area < 32², < 96², larger): " + "  ".join(
        f"{k} {n} ({100 * n / total:.0f} %)" for k, n in d["box_sizes"].items()))
    out.append("  sqrt(area) px: " + "  ".join(f"{k}: {n}" for k, n in
                                              d["sqrt_area_histogram"].items()))
    if not d["images_checked"]:
        out.append("  images: not checked (give --img-dir)")
    for title, part in (("errors", d["errors"]), ("warnings", d["warnings"])):
        if part:
            out.append(f"  {title}:")
        for kind, f in part.items():
            out.append(f"    {kind}: {f['count']} — {f['why']}")
            out += [f"      e.g. {e}" for e in f["examples"]]
    n_warn = sum(f["count"] for f in d["warnings"].values())
    out.append(f"  {rep.n_errors} errors, {n_warn} warnings")
    return "\n".join(out)
