"""``hat convert yolo|voc``: YOLO-txt and Pascal-VOC folders -> a COCO instances JSON.

The JSON's ``file_name``s are relative to the image folder, so the result packs with
``hat pack coco --ann-file OUT --img-dir IMG_DIR`` or loads as a ``type = "coco"`` dataset.
Coordinate conventions (docs/coco.md, "Importing YOLO and VOC"):

- YOLO: one ``class cx cy w h`` line per box, normalised by the displayed image's width and
  height; COCO ``bbox = [(cx - w/2) W, (cy - h/2) H, w W, h H]``; category id = class + 1.
- VOC: ``xmin..xmax`` are 1-based pixel indices, both ends included, so pixel ``i`` covers
  ``[i - 1, i]`` and ``bbox = [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]``.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from hatcore.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def read_class_names(path: Path) -> list[str]:
    """One class name per line (``classes.txt`` / darknet ``obj.names``); blank lines skipped."""
    try:
        names = [line.strip() for line in path.read_text().splitlines()]
    except OSError as exc:
        raise UserError(f"{path}: cannot read the class list ({exc.strerror})") from None
    names = [n for n in names if n]
    if not names:
        raise UserError(f"{path}: no class names (expected one name per line)")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise UserError(f"{path}: class names repeated: {', '.join(dup)}")
    return names


def displayed_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image file as displayed (EXIF orientation applied), from its header."""
    from PIL import Image, UnidentifiedImageError

    from hat_coco.decode import ORIENTATION_TAG

    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(ORIENTATION_TAG, 1)
    except FileNotFoundError:
        raise UserError(f"{path}: image not found") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"{path}: not a readable image ({exc})") from None
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def _coco(images: list[dict[str, Any]], anns: list[dict[str, Any]], names: list[str],
          description: str) -> dict[str, Any]:
    return {"info": {"description": description},
            "images": images, "annotations": anns,
            "categories": [{"id": i + 1, "name": n, "supercategory": ""}
                           for i, n in enumerate(names)]}


def _image_files(img_dir: Path) -> list[Path]:
    if not img_dir.is_dir():
        raise UserError(f"{img_dir}: --img-dir is not a folder")
    files = sorted(p for p in img_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"{img_dir}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    return files


def default_label_dir(img_dir: Path) -> Path:
    """Ultralytics' rule: the last ``images`` component of the path becomes ``labels``;
    without one, labels sit next to the images (darknet)."""
    parts = list(img_dir.parts)
    if "images" in parts:
        i = len(parts) - 1 - parts[::-1].index("images")
        parts[i] = "labels"
        return Path(*parts)
    return img_dir


def yolo_to_coco(img_dir: Path, names: list[str], label_dir: Path | None = None
                 ) -> tuple[dict[str, Any], dict[str, int]]:
    """Read a YOLO folder: every image under ``img_dir``, its ``.txt`` under ``label_dir``
    (same relative path). An image without a label file has no boxes.

    :returns: the COCO dict and counts ``{"images", "boxes", "without_labels"}``.
    """
    label_dir = default_label_dir(img_dir) if label_dir is None else label_dir
    images, anns = [], []
    without = 0
    for image_id, path in enumerate(_image_files(img_dir), 1):
        rel = path.relative_to(img_dir)
        h, w = displayed_size(path)
        images.append({"id": image_id, "file_name": rel.as_posix(), "height": h, "width": w})
        txt = (label_dir / rel).with_suffix(".txt")
        if not txt.is_file():
            without += 1
            continue
        for lineno, line in enumerate(txt.read_text().splitlines(), 1):
            if not line.strip():
                continue
            cls, cx, cy, bw, bh = _yolo_line(line, txt, lineno, len(names))
            box = [(cx - bw / 2) * w, (cy - bh / 2) * h, bw * w, bh * h]
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cls + 1,
                         "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
    data = _coco(images, anns, names, f"converted by `hat convert yolo` from {img_dir}")
    return data, {"images": len(images), "boxes": len(anns), "without_labels": without}


def _yolo_line(line: str, txt: Path, lineno: int, num_classes: int
               ) -> tuple[int, float, float, float, float]:
    fields = line.split()
    where = f"{txt}:{lineno}"
    if len(fields) != 5:
        raise UserError(f"{where}: expected 'class cx cy w h' (5 numbers), got {len(fields)} "
                        f"fields: {line.strip()!r} (segment polygons are not supported)")
    try:
        cls = int(fields[0])
        cx, cy, bw, bh = (float(v) for v in fields[1:])
    except ValueError:
        raise UserError(f"{where}: not numbers: {line.strip()!r}") from None
    if not 0 <= cls < num_classes:
        raise UserError(f"{where}: class {cls} is not in the class list (0..{num_classes - 1})")
    return cls, cx, cy, bw, bh


def voc_to_coco(ann_dir: Path, img_dir: Path, names: list[str] | None = None,
                image_set: Path | None = None, difficult: str = "ignore"
                ) -> tuple[dict[str, Any], dict[str, int]]:
    """Read Pascal-VOC XML files (every ``*.xml`` of ``ann_dir``, or the ids an ImageSets list
    names). ``difficult``: ``ignore`` (iscrowd = 1: the COCO metric neither rewards nor
    punishes detections of them, as VOC's evaluation does), ``keep`` or ``drop``.
    ``names`` None: the names found, sorted.

    :returns: the COCO dict and counts ``{"images", "boxes", "difficult"}``.
    """
    if not ann_dir.is_dir():
        raise UserError(f"{ann_dir}: --ann-dir is not a folder")
    if image_set is not None:
        try:
            ids = [ln.split()[0] for ln in image_set.read_text().splitlines() if ln.strip()]
        except OSError as exc:
            raise UserError(f"{image_set}: cannot read the image set ({exc.strerror})") from None
        xmls = [ann_dir / f"{i}.xml" for i in ids]
    else:
        xmls = sorted(ann_dir.glob("*.xml"))
    if not xmls:
        raise UserError(f"{ann_dir}: no .xml annotation files")
    parsed = [_parse_voc(x, img_dir) for x in xmls]
    found = sorted({o["name"] for _, objs in parsed for o in objs})
    names = found if names is None else names
    cat = {n: i + 1 for i, n in enumerate(names)}
    images, anns = [], []
    n_difficult = 0
    for image_id, ((image, objs), xml) in enumerate(zip(parsed, xmls, strict=True), 1):
        images.append({"id": image_id, **image})
        for o in objs:
            if o["name"] not in cat:
                raise UserError(f"{xml}: object class {o['name']!r} is not in the class list "
                                f"({', '.join(names)})")
            n_difficult += o["difficult"]
            if o["difficult"] and difficult == "drop":
                continue
            x1, y1, x2, y2 = o["box"]
            box = [x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1]
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat[o["name"]],
                         "bbox": box, "area": box[2] * box[3],
                         "iscrowd": int(o["difficult"] and difficult == "ignore")})
    data = _coco(images, anns, names, f"converted by `hat convert voc` from {ann_dir}")
    return data, {"images": len(images), "boxes": len(anns), "difficult": n_difficult}


def _parse_voc(xml: Path, img_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    try:
        root = ET.parse(xml).getroot()
    except FileNotFoundError:
        raise UserError(f"{xml}: annotation file not found (named by the image set)") from None
    except ET.ParseError as exc:
        raise UserError(f"{xml}: not valid XML ({exc})") from None

    def text(node: ET.Element, tag: str, what: str) -> str:
        value = node.findtext(tag)
        if value is None or not value.strip():
            raise UserError(f"{xml}: <{tag}> missing in {what}")
        return value.strip()

    file_name = text(root, "filename", "<annotation>")
    size = root.find("size")
    w = int(float(size.findtext("width") or 0)) if size is not None else 0
    h = int(float(size.findtext("height") or 0)) if size is not None else 0
    if w <= 0 or h <= 0:  # some exporters leave <size> out or at 0: read it from the image
        h, w = displayed_size(img_dir / file_name)
    objs = []
    for k, obj in enumerate(root.iter("object"), 1):
        what = f"<object> #{k}"
        bb = obj.find("bndbox")
        if bb is None:
            raise UserError(f"{xml}: <bndbox> missing in {what}")
        try:
            box = [float(text(bb, t, what)) for t in ("xmin", "ymin", "xmax", "ymax")]
        except ValueError:
            raise UserError(f"{xml}: {what}: <bndbox> values are not numbers") from None
        objs.append({"name": text(obj, "name", what), "box": box,
                     "difficult": int(float(obj.findtext("difficult") or 0)) != 0})
    return {"file_name": file_name, "height": h, "width": w}, objs


def write_json(data: dict[str, Any], out: Path) -> None:
    """Write atomically (temporary file, then rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, out)
