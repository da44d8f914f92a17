"""Generated COCO-format sets of coloured shapes on textured backgrounds, in two presets.

``generate(root, split, num_images, image_size, seed, preset)`` writes the layout ``hat pack coco``
reads: ``root/{split}2017/*.jpg`` and ``root/annotations/instances_{split}2017.json``. Each class
has its own shape and a hue band.

- ``"demo"``: large, distinct objects (9-40 % of the image side, 1-5 per image, IoU between boxes
  <= 0.3, none more than 40 % covered), so a small detector learns them in minutes (AP ~ 85).
- ``"dense"``: a set that is not saturated: 10-60 objects per image, 8-48 px on a side,
  overlapping freely (later objects occlude earlier ones; an object is annotated with the box of
  its visible pixels when at least half of it is visible), on a busier texture, among unannotated
  clutter (grey blobs, outlines of shapes, streaks).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from hat_coco.locking import file_lock
from hatcore.errors import UserError

CLASSES = ("circle", "square", "triangle", "cross")
_HUES = (0, 45, 90, 135)  # OpenCV hue (0..180) band centre per class
_SPLIT_CODE = {"train": 1, "val": 2}


def _polygon(cls: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """The outline of one shape of circumradius ``r`` as ``int32[K, 2]`` points."""
    if cls == "circle":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif cls == "square":
        t = np.array([0.25, 0.75, 1.25, 1.75]) * np.pi + angle
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif cls == "triangle":
        t = np.array([-0.5, 1 / 6, 5 / 6]) * np.pi + angle
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    else:  # cross: a plus sign, arms a third of the width
        a = 1 / 3
        pts = np.array([[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1],
                        [-a, a], [-1, a], [-1, -a], [-a, -a]], np.float64) / np.sqrt(1 + a * a)
        c, s = np.cos(angle), np.sin(angle)
        pts = pts @ np.array([[c, s], [-s, c]])
    return np.round(pts * r + [cx, cy]).astype(np.int32)


def _background(g: np.random.Generator, size: int) -> np.ndarray:
    """A textured, low-saturation background: blurred noise, a gradient and some lines (BGR)."""
    base = g.integers(60, 200, 3).astype(np.float32)
    noise = cv2.resize(g.normal(0, 40, (8, 8, 3)).astype(np.float32), (size, size),
                       interpolation=cv2.INTER_CUBIC)
    grad = np.linspace(-30, 30, size, dtype=np.float32)[None, :, None] * g.uniform(-1, 1)
    img = base + 0.5 * noise + grad + g.normal(0, 8, (size, size, 3)).astype(np.float32)
    grey = img.mean(2, keepdims=True)
    img = np.clip(grey + 0.35 * (img - grey), 0, 255).astype(np.uint8)
    for _ in range(int(g.integers(0, 6))):
        p1 = tuple(int(v) for v in g.integers(0, size, 2))
        p2 = tuple(int(v) for v in g.integers(0, size, 2))
        col = tuple(int(v) for v in g.integers(40, 220, 3))
        cv2.line(img, p1, p2, col, int(g.integers(1, 4)), cv2.LINE_AA)
    return img


def _overlap_ok(a: np.ndarray, b: np.ndarray) -> bool:
    """IoU <= 0.3 and neither box more than 40 % covered by the other (none hidden)."""
    lt, rb = np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])
    inter = float(np.prod(np.clip(rb - lt, 0, None)))
    area_a, area_b = float(np.prod(a[2:] - a[:2])), float(np.prod(b[2:] - b[:2]))
    return inter <= 0.3 * (area_a + area_b - inter) and inter <= 0.4 * min(area_a, area_b)


def draw_image(g: np.random.Generator, size: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """One image (BGR uint8) and its objects: ``category_id`` (1-based), ``bbox`` xywh, polygon."""
    img = _background(g, size)
    objects: list[dict[str, Any]] = []
    boxes: list[np.ndarray] = []
    for _ in range(int(g.integers(1, 6))):
        for _try in range(20):
            label = int(g.integers(0, len(CLASSES)))
            r = g.uniform(0.045, 0.2) * size
            cx, cy = g.uniform(r * 0.8, size - r * 0.8, 2)
            poly = _polygon(CLASSES[label], cx, cy, r, g.uniform(-0.3, 0.3))
            poly = np.clip(poly, 0, size - 1)
            x1, y1 = poly.min(0)
            x2, y2 = poly.max(0) + 1
            box = np.array([x1, y1, x2, y2], np.float64)
            if min(x2 - x1, y2 - y1) >= 8 and all(_overlap_ok(box, b) for b in boxes):
                break
        else:
            continue
        hue = (_HUES[label] + int(g.integers(-12, 13))) % 180
        hsv = np.array([[[hue, int(g.integers(150, 256)), int(g.integers(140, 256))]]], np.uint8)
        colour = tuple(int(v) for v in cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0])
        cv2.fillPoly(img, [poly], colour, cv2.LINE_AA)
        boxes.append(box)
        objects.append({"category_id": label + 1, "bbox": [float(x1), float(y1),
                        float(x2 - x1), float(y2 - y1)],
                        "area": float(cv2.contourArea(poly.astype(np.float32))),
                        "segmentation": [poly.reshape(-1).astype(float).tolist()]})
    return img, objects


def _dense_background(g: np.random.Generator, size: int) -> np.ndarray:
    """The demo background plus finer texture: a high-frequency noise layer, stripes, lines."""
    img = _background(g, size).astype(np.float32)
    cells = int(g.integers(16, 48))
    fine = cv2.resize(g.normal(0, 25, (cells, cells, 1)).astype(np.float32), (size, size),
                      interpolation=cv2.INTER_LINEAR)[..., None]
    img += fine
    if g.random() < 0.5:  # stripes
        period = g.uniform(6, 24)
        xs = np.arange(size, dtype=np.float32)
        angle = g.uniform(0, np.pi)
        wave = np.sin((xs[None, :] * np.cos(angle) + xs[:, None] * np.sin(angle)) * 2 * np.pi /
                      period)
        img += (12 * wave)[..., None]
    img = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(int(g.integers(4, 16))):
        p1 = tuple(int(v) for v in g.integers(0, size, 2))
        p2 = tuple(int(v) for v in g.integers(0, size, 2))
        col = tuple(int(v) for v in g.integers(30, 230, 3))
        cv2.line(img, p1, p2, col, int(g.integers(1, 3)), cv2.LINE_AA)
    return img


def _clutter(g: np.random.Generator, img: np.ndarray) -> None:
    """Unannotated distractors: grey (low-saturation) blobs and outlines of the classes' shapes."""
    size = img.shape[0]
    for _ in range(int(g.integers(5, 20))):
        r = g.uniform(4, 24)
        cx, cy = g.uniform(0, size, 2)
        if g.random() < 0.5:
            axes = (int(r), int(r * g.uniform(0.3, 1.0)))
            grey = int(g.integers(40, 220))
            col = tuple(int(np.clip(grey + v, 0, 255)) for v in g.integers(-15, 16, 3))
            cv2.ellipse(img, (int(cx), int(cy)), axes, float(g.uniform(0, 180)), 0, 360, col, -1,
                        cv2.LINE_AA)
        else:
            cls = CLASSES[int(g.integers(0, len(CLASSES)))]
            poly = _polygon(cls, cx, cy, r, g.uniform(-0.3, 0.3))
            col = tuple(int(v) for v in g.integers(30, 230, 3))
            cv2.polylines(img, [poly], True, col, 1, cv2.LINE_AA)


def draw_dense_image(g: np.random.Generator, size: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """One ``"dense"`` image (BGR uint8) and its objects (see the module docstring)."""
    img = _dense_background(g, size)
    _clutter(g, img)
    owner = np.full((size, size), -1, np.int32)  # which object each pixel shows
    drawn: list[tuple[int, np.ndarray, int]] = []  # label, polygon, full pixel count
    for k in range(int(g.integers(10, 61))):
        label = int(g.integers(0, len(CLASSES)))
        side = g.uniform(8, 48)
        cx, cy = g.uniform(0, size, 2)
        poly = np.clip(_polygon(CLASSES[label], cx, cy, side / 2, g.uniform(-0.3, 0.3)), 0,
                       size - 1)
        mask = np.zeros((size, size), np.uint8)
        cv2.fillPoly(mask, [poly], 1)
        full = int(mask.sum())
        if full == 0:
            continue
        hue = (_HUES[label] + int(g.integers(-12, 13))) % 180
        hsv = np.array([[[hue, int(g.integers(150, 256)), int(g.integers(140, 256))]]], np.uint8)
        colour = tuple(int(v) for v in cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0])
        cv2.fillPoly(img, [poly], colour, cv2.LINE_AA)
        owner[mask > 0] = k
        drawn.append((label, poly, full))
    objects: list[dict[str, Any]] = []
    for k, (label, poly, full) in enumerate(drawn):
        ys, xs = np.nonzero(owner == k)
        if len(xs) < 0.5 * full:  # more than half hidden: not annotated
            continue
        x1, y1, x2, y2 = float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)
        if min(x2 - x1, y2 - y1) < 4:
            continue
        objects.append({"category_id": label + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "area": float(len(xs)),
                        "segmentation": [poly.reshape(-1).astype(float).tolist()]})
    return img, objects


PRESETS = {"demo": draw_image, "dense": draw_dense_image}


def ann_path(root: Path, split: str) -> Path:
    return root / "annotations" / f"instances_{split}2017.json"


def generate(root: str | Path, split: str, num_images: int, image_size: int, seed: int,
             preset: str = "demo") -> Path:
    """Write the split if it is not there yet (atomically: temp folder, then rename).

    :param preset: ``"demo"`` or ``"dense"`` (module docstring).

    :returns: the instances JSON path.
    :raises UserError: the split exists but was generated with other settings.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / f".{split}.lock"):  # another rank may be generating it right now
        return _generate(root, split, num_images, image_size, seed, preset)


def _generate(root: Path, split: str, num_images: int, image_size: int, seed: int,
              preset: str) -> Path:
    if preset not in PRESETS:
        raise UserError(f"shapes: unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    params: dict[str, Any] = {"num_images": num_images, "image_size": image_size, "seed": seed,
                              "version": 1}
    if preset != "demo":  # the demo's params stay as they were: sets generated before still fit
        params["preset"] = preset
    draw = PRESETS[preset]
    ann = ann_path(root, split)
    if ann.is_file():
        info = json.loads(ann.read_text()).get("info", {})
        if info.get("generator") == "hat-coco shapes" and info.get("params") != params:
            raise UserError(f"{ann}: generated with {info.get('params')}, but the recipe asks for "
                            f"{params}; delete {root} or choose another `root`")
        return ann
    if num_images < 1 or image_size < 64:
        raise UserError(f"shapes: num_images must be >= 1 and image_size >= 64, got "
                        f"{num_images} and {image_size}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{split}-", dir=root))
    try:
        (tmp / f"{split}2017").mkdir()
        images: list[dict[str, Any]] = []
        anns: list[dict[str, Any]] = []
        for i in range(num_images):
            g = np.random.default_rng([seed, _SPLIT_CODE.get(split, 3), i])
            img, objects = draw(g, image_size)
            name = f"{i + 1:012d}.jpg"
            cv2.imwrite(str(tmp / f"{split}2017" / name), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
            images.append({"id": i + 1, "file_name": name, "height": image_size,
                           "width": image_size})
            for obj in objects:
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "iscrowd": 0, **obj})
        cats = [{"id": k + 1, "name": n, "supercategory": "shape"} for k, n in enumerate(CLASSES)]
        data = {"info": {"generator": "hat-coco shapes", "params": params}, "images": images,
                "annotations": anns, "categories": cats}
        (tmp / "instances.json").write_text(json.dumps(data))
        img_dir = root / f"{split}2017"
        if img_dir.exists():  # left by an interrupted run: its JSON was never written
            shutil.rmtree(img_dir)
        os.replace(tmp / f"{split}2017", img_dir)
        ann.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / "instances.json", ann)  # the JSON last: its presence means "complete"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ann
