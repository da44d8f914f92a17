"""Datasets: shapes generation, the COCO folder dataset and the collated batch contract."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hat_coco import specs as S
from hat_coco import transforms as T
from hat_coco.datasets import CocoDataset
from hat_coco.plugin import build_dataset, build_transform
from hat_coco.shapes import CLASSES, generate

from hatcore.errors import UserError


def _val_transforms() -> list:
    return [build_transform(spec=s) for s in (
        S.ResizeSpec(type="resize", img_scale=[128, 128]), S.PadSpec(type="pad", divisor=32),
        S.ToTensorSpec(type="to_tensor"), S.NormalizeSpec(type="normalize"))]


def test_shapes_is_deterministic_and_coco_format(tmp_path: Path, shapes_root: Path) -> None:
    ann = generate(tmp_path, "val", 12, 160, 0)
    again = shapes_root / "annotations" / "instances_val2017.json"
    assert json.loads(ann.read_text()) == json.loads(again.read_text())
    for name in ("000000000001.jpg", "000000000012.jpg"):
        assert (tmp_path / "val2017" / name).read_bytes() == (
            shapes_root / "val2017" / name).read_bytes()
    data = json.loads(ann.read_text())
    assert [c["name"] for c in data["categories"]] == list(CLASSES)
    per_image = np.bincount([a["image_id"] for a in data["annotations"]], minlength=13)[1:]
    assert per_image.min() >= 1 and per_image.max() <= 5
    assert not list(tmp_path.glob(".val-*")), "the temp folder must be gone"


def test_shapes_refuses_other_settings_in_same_root(shapes_root: Path) -> None:
    with pytest.raises(UserError, match="delete"):
        generate(shapes_root, "val", 13, 160, 0)


def test_hook_build_dataset_shapes_gives_the_batch_contract(shapes_root: Path) -> None:
    spec = S.ShapesSpec(type="shapes", root=str(shapes_root), num_images=12, image_size=160)
    ds = build_dataset(spec=spec, split="val", transforms=_val_transforms())
    assert ds.class_names == list(CLASSES) and ds.cat_ids == [1, 2, 3, 4]
    batch = ds.collate_fn([ds[0], ds[1]])
    assert batch["img"].shape == (2, 3, 128, 128) and batch["img"].dtype == torch.float32
    assert batch["img"].abs().max() <= 1.0
    for boxes, labels, meta in zip(batch["gt_boxes"], batch["gt_labels"], batch["meta"],
                                   strict=True):
        assert boxes.shape[1] == 4 and labels.dtype == torch.int64
        assert meta["scale"] == (0.8, 0.8) and meta["orig_size"] == (160, 160)
        assert meta["pad_shape"] == (128, 128)
    # the boxes are the JSON's boxes, scaled
    data = json.loads((shapes_root / "annotations" / "instances_val2017.json").read_text())
    first = [a for a in data["annotations"] if a["image_id"] == 1]
    x, y, w, h = first[0]["bbox"]
    assert torch.allclose(batch["gt_boxes"][0][0], torch.tensor([x, y, x + w, y + h]) * 0.8)
    assert int(batch["gt_labels"][0][0]) == first[0]["category_id"] - 1


def test_collate_pads_different_sizes_to_the_largest() -> None:
    items = []
    for h, w in ((40, 60), (64, 32)):
        s = {"img": np.full((h, w, 3), 200, np.uint8), "gt_boxes": np.zeros((0, 4), np.float32),
             "gt_labels": np.zeros(0, np.int64), "meta": {"img_shape": (h, w)}}
        items.append(T.ToTensor(to_yuv=False)(s))
    batch = T.collate(items)
    assert batch["img"].shape == (2, 3, 64, 60)
    assert batch["img"][0, :, 40:].abs().sum() == 0 and batch["img"][0, :, :40, :60].min() == 200
    assert batch["meta"][1]["pad_shape"] == (64, 60)


def test_missing_image_is_reported_by_path(tmp_path: Path, shapes_root: Path) -> None:
    ann = shapes_root / "annotations" / "instances_val2017.json"
    ds = CocoDataset(ann, tmp_path, [])
    with pytest.raises(UserError, match="000000000001.jpg"):
        ds[0]


def test_corrupt_jpeg_in_folder_names_the_file(tmp_path: Path, shapes_root: Path) -> None:
    ann = shapes_root / "annotations" / "instances_val2017.json"
    good = (shapes_root / "val2017" / "000000000001.jpg").read_bytes()
    (tmp_path / "000000000001.jpg").write_bytes(good[: len(good) // 3])
    ds = CocoDataset(ann, tmp_path, [])
    with pytest.raises(UserError, match=r"000000000001\.jpg: corrupt JPEG"):
        ds[0]
