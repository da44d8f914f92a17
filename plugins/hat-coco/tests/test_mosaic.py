"""Mosaic keeps boxes on their pixels (hypothesis), switches off for the last epochs, MixUp."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from hat_coco.transforms import Mosaic, mosaic_canvas
from hypothesis import given, settings
from hypothesis import strategies as st


def _sample(g: np.random.Generator, h: int, w: int, n: int, value: int) -> dict[str, Any]:
    """An image of zeros with ``n`` boxes: channel 0 is 255 on every box, channel 1 the box's
    own value (value + i)."""
    img = np.zeros((h, w, 3), np.uint8)
    boxes, labels = [], []
    for i in range(n):
        bw, bh = int(g.integers(8, max(9, w // 2))), int(g.integers(8, max(9, h // 2)))
        x, y = int(g.integers(0, w - bw + 1)), int(g.integers(0, h - bh + 1))
        img[y:y + bh, x:x + bw] = (255, value + i, 0)
        boxes.append([x, y, x + bw, y + bh])
        labels.append(value + i)
    return {"img": img, "gt_boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
            "gt_labels": np.asarray(labels, np.int64), "meta": {}}


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), side=st.integers(32, 96),
       cy=st.floats(0.5, 1.5), cx=st.floats(0.5, 1.5))
def test_mosaic_boxes_stay_on_their_pixels(seed: int, side: int, cy: float, cx: float) -> None:
    g = np.random.default_rng(seed)
    # sample k paints 40 k + 40: a pixel with channel 0 = 255 tells its box by channel 1
    samples = []
    for k in range(4):
        h, w = int(g.integers(24, 120)), int(g.integers(24, 120))
        samples.append(_sample(g, h, w, 1, 40 * k + 40))  # one box each: no overlap in an image
    centre = (int(cy * side), int(cx * side))
    canvas, boxes, labels = mosaic_canvas(samples, (side, side), centre)
    assert canvas.shape == (2 * side, 2 * side, 3)
    assert len(boxes) == len(labels) == 4
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 2 * side).all()
    assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= 2 * side).all()
    assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
    mask, ids = canvas[..., 0] == 255, canvas[..., 1].astype(int)
    for (x1, y1, x2, y2), value in zip(boxes, labels, strict=True):
        # inside the box (2 px in from the edges, which resizing blends): its pixels only
        ix1, iy1, ix2, iy2 = int(np.ceil(x1)) + 2, int(np.ceil(y1)) + 2, int(x2) - 2, int(y2) - 2
        if ix2 > ix1 and iy2 > iy1:
            assert mask[iy1:iy2, ix1:ix2].all()
            assert (np.abs(ids[iy1:iy2, ix1:ix2] - value) <= 1).all()
        # and its pixels lie nowhere outside the box
        ys, xs = np.nonzero(mask & (ids == value))
        if len(xs):
            assert xs.min() >= x1 - 2 and xs.max() <= x2 + 1 and ys.min() >= y1 - 2 \
                and ys.max() <= y2 + 1
    # every object pixel on the canvas belongs to some box
    ys, xs = np.nonzero(mask)
    inside = np.zeros(len(xs), bool)
    for x1, y1, x2, y2 in boxes:
        inside |= (xs >= x1 - 2) & (xs <= x2 + 1) & (ys >= y1 - 2) & (ys <= y2 + 1)
    assert inside.all()


class _Data:
    def __init__(self, samples: list[dict[str, Any]]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def raw_sample(self, i: int) -> dict[str, Any]:
        s = self.samples[int(i)]
        return {k: (v.copy() if hasattr(v, "copy") else v) for k, v in s.items()}


def test_mosaic_turns_off_for_the_last_epochs_and_mixup_keeps_both_box_sets() -> None:
    g = np.random.default_rng(0)
    data = _Data([_sample(g, 64, 64, 2, 40 + 40 * k) for k in range(4)])
    t = Mosaic([64, 64], off_last_epochs=2)
    t.bind(data)
    torch.manual_seed(0)
    t.set_epoch(7, 10)  # epochs 8, 9, 10 of 10: 7 is before the last two
    out = t(data.raw_sample(0))
    assert out["img"].shape == (128, 128, 3) and out["meta"]["mosaic"]
    t.set_epoch(8, 10)
    plain = t(data.raw_sample(0))
    assert plain["img"].shape == (64, 64, 3) and len(plain["gt_boxes"]) == 2
    m = Mosaic([64, 64], mixup_prob=1.0, min_box=0.0)
    m.bind(data)
    torch.manual_seed(1)
    mixed = m(data.raw_sample(0))
    # 4 images x 2 boxes from the mosaic (some may be cut to nothing) + the 2 of the MixUp image
    assert len(mixed["gt_boxes"]) == 10 and len(mixed["gt_labels"]) == 10
