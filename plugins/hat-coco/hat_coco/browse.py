"""``hat data browse``: a recipe split's ground truth drawn, as the model sees it or raw.

"As the model sees it" runs the split's transforms in order and draws the last sample whose
image is still HWC uint8 pixels: every geometric and colour transform (resize, crop, flip,
HSV, pad ...) is applied; the encoding steps that follow (``to_tensor``'s YUV, ``normalize``)
change how the pixels are stored, not where the boxes are, and are not drawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from hat_coco.datasets import DetectionDataset
from hat_coco.draw import draw_boxes
from hatcore.errors import UserError


def is_pixels(img: Any) -> bool:
    return isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 3


def seen_sample(ds: DetectionDataset, index: int) -> dict[str, Any]:
    """Sample ``index`` after every transform up to the first that leaves pixel space."""
    sample = ds.raw_sample(index)
    for t in ds.transforms:
        before = {**sample, "meta": dict(sample["meta"])}  # transforms may edit in place
        sample = t(sample)
        if not is_pixels(sample["img"]):
            return before
    return sample


def browse(ds: Any, out_dir: Path, n: int, raw: bool, seed: int = 0) -> list[Path]:
    """Draw the ground truth of the first ``n`` images of ``ds`` into ``out_dir``.

    :returns: the PNGs written, ``{index:04d}_{file stem}.png``.
    """
    if not isinstance(ds, DetectionDataset):
        raise UserError(f"`hat data browse` draws hat-coco datasets (coco, coco_lmdb, shapes), "
                        f"not {type(ds).__name__}")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(min(n, len(ds))):
        torch.manual_seed(seed + i)  # random transforms repeat, and image i does not depend on n
        sample = ds.raw_sample(i) if raw else seen_sample(ds, i)
        boxes = np.asarray(sample["gt_boxes"], np.float32).reshape(-1, 4).tolist()
        labels = [int(v) for v in np.asarray(sample["gt_labels"]).reshape(-1)]
        texts = [ds.class_names[lb] for lb in labels]
        path = out_dir / f"{i:04d}_{Path(sample['meta']['file_name']).stem}.png"
        if not cv2.imwrite(str(path), draw_boxes(sample["img"], boxes, labels, texts)):
            raise UserError(f"{path}: cannot write the PNG")
        written.append(path)
    return written
