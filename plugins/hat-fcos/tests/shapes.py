"""Synthetic shapes images and a pycocotools AP for the hat-fcos tests and demo."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch

COLOURS = [(230, 40, 40), (40, 220, 40), (40, 60, 230)]


def make_images(n: int, size: int = 128, seed: int = 0, max_objs: int = 3
                ) -> dict[str, object]:
    """``n`` images with 1..max_objs filled rectangles; class = colour. Returns a batch."""
    rng = np.random.default_rng(seed)
    imgs, boxes, labels = [], [], []
    for _ in range(n):
        img = np.full((size, size, 3), 90, np.float32) + rng.normal(0, 8, (size, size, 3))
        bs, ls = [], []
        for _ in range(rng.integers(1, max_objs + 1)):
            w, h = rng.integers(size // 6, size // 2, 2)
            x0, y0 = rng.integers(0, size - w), rng.integers(0, size - h)
            c = int(rng.integers(len(COLOURS)))
            img[y0:y0 + h, x0:x0 + w] = COLOURS[c]
            bs.append([x0, y0, x0 + w, y0 + h])
            ls.append(c)
        imgs.append(torch.from_numpy((img - 128) / 128).permute(2, 0, 1).float())
        boxes.append(torch.tensor(bs, dtype=torch.float32))
        labels.append(torch.tensor(ls))
    meta = [{"image_id": i, "orig_size": (size, size), "img_shape": (size, size),
             "scale": (1.0, 1.0)} for i in range(n)]
    return {"img": torch.stack(imgs), "gt_boxes": boxes, "gt_labels": labels, "meta": meta}


def coco_ap(batch: dict[str, object], dets: list[dict[str, torch.Tensor]]) -> float:
    """COCO AP@[.5:.95] of ``dets`` against the batch's GT (pycocotools)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, anns, results = [], [], []
    for i, (b, lab) in enumerate(zip(batch["gt_boxes"], batch["gt_labels"], strict=True)):
        images.append({"id": i, "height": 1, "width": 1})
        for bb, ll in zip(b.tolist(), lab.tolist(), strict=True):
            w, h = bb[2] - bb[0], bb[3] - bb[1]
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": ll,
                         "bbox": [bb[0], bb[1], w, h], "area": w * h, "iscrowd": 0})
        d = dets[i]
        for bb, s, ll in zip(d["boxes"].tolist(), d["scores"].tolist(), d["labels"].tolist(),
                             strict=True):
            results.append({"image_id": i, "category_id": ll, "score": s,
                            "bbox": [bb[0], bb[1], bb[2] - bb[0], bb[3] - bb[1]]})
    if not results:
        return 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns,
                      "categories": [{"id": c} for c in range(len(COLOURS))]}
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0])
