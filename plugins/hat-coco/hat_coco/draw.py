"""Drawing detections on the original images (``draw_detections`` hook, ``hat infer``)."""

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


def draw(img: np.ndarray, det: dict[str, torch.Tensor], class_names: list[str],
         score_thr: float) -> np.ndarray:
    """Boxes (original-image xyxy), class names and scores on an RGB image; returns BGR."""
    out = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    thick = max(1, round(max(img.shape[:2]) / 320))
    keep = det["scores"] >= score_thr
    for box, score, label in zip(det["boxes"][keep].tolist(), det["scores"][keep].tolist(),
                                 det["labels"][keep].tolist(), strict=True):
        x1, y1, x2, y2 = (round(v) for v in box)
        col = _colour(int(label))
        name = class_names[label] if 0 <= label < len(class_names) else str(label)
        cv2.rectangle(out, (x1, y1), (x2, y2), col, thick)
        text = f"{name} {score:.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thick, 1)
        ty = max(y1, th + base)
        cv2.rectangle(out, (x1, ty - th - base), (x1 + tw, ty), col, -1)
        cv2.putText(out, text, (x1, ty - base), cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thick,
                    (0, 0, 0), 1, cv2.LINE_AA)
    return out


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
