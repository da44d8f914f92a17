"""Drawing boxes: detections on the original images (``draw_detections`` hook, ``hat infer``),
ground truth (``hat data browse``). Labels are never clipped at the image borders."""

from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from hat_coco.decode import decode_rgb


def load_original(source: dict[str, str]) -> np.ndarray | None:
    """The original RGB image named by ``meta["source"]``: a file path or an LMDB key."""
    if "path" in source:
        return decode_rgb(Path(source["path"]).read_bytes())
    if "lmdb" in source:
        from hat_coco.lmdb_store import open_readonly

        with open_readonly(source["lmdb"]).begin() as txn:
            data = txn.get(source["key"].encode())
        return None if data is None else decode_rgb(data)
    return None


def _colour(label: int) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((label * 0.618034) % 1.0, 0.85, 1.0)
    return int(b * 255), int(g * 255), int(r * 255)


def label_box(anchor: tuple[float, float], text_size: tuple[int, int],
              image_size: tuple[int, int]) -> tuple[int, int]:
    """Top-left corner of a label ``text_size`` (w, h) for a box whose top-left is ``anchor``
    (x, y), on an image ``image_size`` (h, w): above the box when there is room, else just inside
    it, and always shifted so the whole label is on the image (never clipped at a border)."""
    (x, y), (tw, lh), (h, w) = anchor, text_size, image_size
    top = y - lh if y - lh >= 0 else y
    return int(min(max(x, 0), max(w - tw, 0))), int(min(max(top, 0), max(h - lh, 0)))


def put_label(out: np.ndarray, text: str, anchor: tuple[float, float],
              colour: tuple[int, int, int], scale: float) -> None:
    """Draw ``text`` on a filled box at ``label_box``'s place; the font shrinks to fit the width."""
    h, w = out.shape[:2]
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    while tw > w and scale > 0.2:
        scale *= 0.8
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    lh = th + base + 2
    x, y = label_box(anchor, (tw, lh), (h, w))
    cv2.rectangle(out, (x, y), (x + tw - 1, y + lh - 1), colour, -1)
    cv2.putText(out, text, (x, y + th + 1), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1,
                cv2.LINE_AA)


def draw_boxes(img: np.ndarray, boxes: list[list[float]], labels: list[int],
               texts: list[str]) -> np.ndarray:
    """Boxes (xyxy pixels) with one text each on an RGB image; returns BGR (for cv2.imwrite)."""
    out = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    thick = max(1, round(max(img.shape[:2]) / 320))
    for box, label, text in zip(boxes, labels, texts, strict=True):
        x1, y1, x2, y2 = (round(v) for v in box)
        col = _colour(int(label))
        cv2.rectangle(out, (x1, y1), (x2, y2), col, thick)
        put_label(out, text, (x1, y1), col, 0.4 * thick)
    return out


def draw(img: np.ndarray, det: dict[str, torch.Tensor], class_names: list[str],
         score_thr: float) -> np.ndarray:
    """Boxes (original-image xyxy), class names and scores on an RGB image; returns BGR."""
    keep = det["scores"] >= score_thr
    labels = det["labels"][keep].tolist()
    texts = [f"{class_names[lb] if 0 <= lb < len(class_names) else lb} {s:.2f}"
             for lb, s in zip(labels, det["scores"][keep].tolist(), strict=True)]
    return draw_boxes(img, det["boxes"][keep].tolist(), labels, texts)


def draw_batch(batch: dict[str, Any], detections: list[dict[str, torch.Tensor]],
               class_names: list[str], paths: list[Path], score_thr: float) -> bool | None:
    """One PNG per image of ``batch``; None when the originals cannot be found from ``meta``."""
    metas = batch.get("meta") or []
    if not metas or not all(isinstance(m.get("source"), dict) for m in metas):
        return None
    for meta, det, path in zip(metas, detections, paths, strict=True):
        img = load_original(meta["source"])
        if img is None:
            return None
        det = {k: v.detach().cpu() for k, v in det.items()}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), draw(img, det, class_names, score_thr))
    return True
