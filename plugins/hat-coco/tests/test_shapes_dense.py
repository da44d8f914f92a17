"""The "dense" shapes preset: many small, partly hidden objects, and a params check."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hat_coco.shapes import draw_dense_image, generate

from hatcore.errors import UserError


def test_dense_images_hold_many_small_objects_within_the_image() -> None:
    counts, sides = [], []
    for i in range(6):
        img, objects = draw_dense_image(np.random.default_rng([0, 9, i]), 256)
        assert img.shape == (256, 256, 3) and img.dtype == np.uint8
        counts.append(len(objects))
        for obj in objects:
            x, y, w, h = obj["bbox"]
            assert 0 <= x and 0 <= y and x + w <= 256 and y + h <= 256
            assert w >= 4 and h >= 4
            sides.append(max(w, h))
    # 10-60 objects drawn, those less than half visible dropped
    assert min(counts) >= 5 and max(counts) <= 60 and np.mean(counts) >= 15, counts
    assert max(sides) <= 50 and np.median(sides) < 40, (min(sides), max(sides))


def test_dense_boxes_are_the_visible_part_of_occluded_objects() -> None:
    # an object's box is the bounding box of the pixels it still shows, so a box never
    # exceeds its full shape's outline (the segmentation polygon) by more than a pixel
    for i in range(4):
        _, objects = draw_dense_image(np.random.default_rng([1, 9, i]), 256)
        for obj in objects:
            poly = np.asarray(obj["segmentation"][0]).reshape(-1, 2)
            x, y, w, h = obj["bbox"]
            assert x >= poly[:, 0].min() - 1 and x + w <= poly[:, 0].max() + 2
            assert y >= poly[:, 1].min() - 1 and y + h <= poly[:, 1].max() + 2
            assert obj["area"] <= w * h


def test_dense_preset_is_recorded_and_refused_over_a_demo_set(tmp_path: Path) -> None:
    ann = generate(tmp_path, "val", 3, 128, 0, preset="dense")
    info = json.loads(ann.read_text())["info"]
    assert info["params"]["preset"] == "dense"
    assert generate(tmp_path, "val", 3, 128, 0, preset="dense") == ann  # same settings: reused
    with pytest.raises(UserError, match="generated with"):
        generate(tmp_path, "val", 3, 128, 0)  # the demo preset over a dense set
    with pytest.raises(UserError, match="unknown preset 'sparse'"):
        generate(tmp_path / "other", "val", 3, 128, 0, preset="sparse")
