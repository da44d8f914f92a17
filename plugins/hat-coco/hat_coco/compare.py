"""Ground truth next to each stage's detections, on the same original images (for the report).

``compare_stages(dataset, {"float": results, "align_bpu": results}, out_dir)`` writes one picture
per image: a panel per source, side by side, each titled, so the float and the deployed model
are seen on the same pixels as the labels. ``results`` are in the COCO results format
(``predict/<stage>/detections.json``: original-image xywh, category ids).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from hat_coco.datasets import DetectionDataset
from hat_coco.decode import decode_rgb
from hat_coco.draw import draw_boxes
from hatcore.errors import UserError

GAP = 6
"""Pixels between two panels."""
MAX_SIDE = 480
"""Longest side of one panel, in pixels (the original image is scaled down to it)."""


def _titled(panel_bgr: np.ndarray, title: str) -> np.ndarray:
    """A white title strip of fixed height above the panel (the font shrinks to fit)."""
    w = panel_bgr.shape[1]
    (_, full), base = cv2.getTextSize("Ag", cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)
    scale = 0.45
    while cv2.getTextSize(title, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0] > w - 4 and scale > 0.2:
        scale *= 0.8
    strip = np.full((full + base + 8, w, 3), 255, np.uint8)
    cv2.putText(strip, title, (2, full + 4), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1,
                cv2.LINE_AA)
    return np.vstack([strip, panel_bgr])


def side_by_side(panels: list[np.ndarray]) -> np.ndarray:
    """BGR panels of one height -> one image, ``GAP`` white pixels between them."""
    h = panels[0].shape[0]
    gap = np.full((h, GAP, 3), 255, np.uint8)
    out = [panels[0]]
    for p in panels[1:]:
        out += [gap, p]
    return np.hstack(out)


def compare_stages(dataset: DetectionDataset, detections: dict[str, list[dict[str, Any]]],
                   out_dir: Path, *, image_ids: list[int] | None = None, n: int = 4,
                   score_thr: float = 0.3, max_side: int = MAX_SIDE,
                   suffix: str = ".png") -> list[Path]:
    """Draw the ground truth and each source's detections (score >= ``score_thr``) of the
    first ``n`` images of ``dataset`` (or of ``image_ids``) into ``out_dir/{image_id}{suffix}``
    (``.png``, or ``.jpg`` at quality 90 — the report's choice: a tenth of the size on photos).
    Each panel is scaled so that its longer side is at most ``max_side`` pixels before drawing,
    so labels keep their size.

    :returns: the pictures written.
    """
    index = {r["image_id"]: i for i, r in enumerate(dataset.records)}
    ids = list(image_ids) if image_ids is not None else [r["image_id"] for r in
                                                         dataset.records[:n]]
    unknown = [i for i in ids if i not in index]
    if unknown:
        raise UserError(f"image ids {unknown[:5]} are not in the dataset")
    label_of = {cid: k for k, cid in enumerate(dataset.cat_ids)}
    by_image: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for name, results in detections.items():
        table: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for r in results:
            if r["score"] >= score_thr and r["category_id"] in label_of:
                table[r["image_id"]].append(r)
        by_image[name] = table
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for image_id in ids:
        rec = dataset.records[index[image_id]]
        img = decode_rgb(dataset.load_bytes(index[image_id]))
        scale = min(1.0, max_side / max(img.shape[:2]))
        if scale < 1.0:
            img = cv2.resize(img, (round(img.shape[1] * scale), round(img.shape[0] * scale)),
                             interpolation=cv2.INTER_AREA)
        gt = [([v * scale for v in b], label_of[c])
              for b, c, crowd in zip(rec["bboxes"], rec["category_ids"], rec["iscrowd"],
                                     strict=True) if not crowd and c in label_of]
        panels = [_titled(_draw(img, gt, [dataset.class_names[k] for _, k in gt]),
                          f"ground truth ({len(gt)})")]
        for name, table in by_image.items():
            found = [([v * scale for v in r["bbox"]], label_of[r["category_id"]])
                     for r in table.get(image_id, [])]
            texts = [f"{dataset.class_names[k]} {r['score']:.2f}"
                     for (_, k), r in zip(found, table.get(image_id, []), strict=True)]
            panels.append(_titled(_draw(img, found, texts),
                                  f"{name} ({len(found)} >= {score_thr:.2f})"))
        path = out_dir / f"{image_id}{suffix}"
        params = [cv2.IMWRITE_JPEG_QUALITY, 90] if suffix in (".jpg", ".jpeg") else []
        if not cv2.imwrite(str(path), side_by_side(panels), params):
            raise UserError(f"{path}: cannot write the PNG")
        written.append(path)
    return written


def _draw(img: np.ndarray, boxes: list[tuple[list[float], int]], texts: list[str]) -> np.ndarray:
    xyxy = [[x, y, x + w, y + h] for (x, y, w, h), _ in boxes]
    return draw_boxes(img, xyxy, [k for _, k in boxes], texts)
