"""Drawing on the original images (folder and LMDB) and `hat infer` with the toy model."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hat_coco import specs as S
from hat_coco.infer import infer_image
from hat_coco.lmdb_store import CocoLmdbDataset, pack_dataset
from hat_coco.plugin import build_dataset, build_transform, draw_detections

from hatcore.checkpoint import save_checkpoint
from hatcore.context import HatContext
from hatcore.plugins import make_plugin_manager


def _val(shapes_root: Path) -> S.ShapesSpec:
    return S.ShapesSpec(type="shapes", root=str(shapes_root), num_images=12, image_size=160)


def _transforms() -> list:
    return [build_transform(spec=S.ResizeSpec(type="resize", img_scale=[96, 96])),
            build_transform(spec=S.ToTensorSpec(type="to_tensor"))]


def _check_png(path: Path) -> None:
    img = cv2.imread(str(path))
    assert img.shape == (160, 160, 3), "drawn on the original image, at its size"
    box_edge = img[40, 20:100]  # the top edge of the drawn box (20, 40)-(100, 120)
    assert (np.abs(box_edge.astype(int) - box_edge[0]).max(1) < 40).all()


@pytest.mark.parametrize("packed", [False, True])
def test_hook_draw_detections_on_original_images(tmp_path: Path, shapes_root: Path,
                                                 packed: bool) -> None:
    ds = build_dataset(spec=_val(shapes_root), split="val", transforms=_transforms())
    if packed:
        pack_dataset(ds, tmp_path / "val_lmdb")
        ds = CocoLmdbDataset(tmp_path / "val_lmdb", _transforms())
    batch = ds.collate_fn([ds[0], ds[1]])
    det = {"boxes": torch.tensor([[20.0, 40, 100, 120], [5, 5, 10, 10]]),
           "scores": torch.tensor([0.9, 0.1]), "labels": torch.tensor([2, 0])}
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    assert draw_detections(batch=batch, detections=[det, det], class_names=ds.class_names,
                           paths=paths, score_thr=0.3) is True
    for p in paths:
        _check_png(p)
    assert draw_detections(batch={"meta": [{}]}, detections=[det], class_names=[],
                           paths=paths[:1], score_thr=0.3) is None


def test_hat_infer_with_the_toy_model(tmp_path: Path, shapes_root: Path) -> None:
    from hat_toy.plugin import ToyDetector

    work = tmp_path / "work"
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'''
[task]
name = "t"
work_dir = "{work}"
device = "cpu"
[model]
type = "toy_detector"
num_classes = 4
[data.val]
type = "shapes"
root = "{shapes_root}"
num_images = 12
image_size = 160
transforms = [{{ type = "resize", img_scale = [96, 96] }}, {{ type = "pad", divisor = 32 }},
              {{ type = "to_tensor" }}, {{ type = "normalize" }}]
''')
    save_checkpoint(work / "float" / "checkpoint-best.pt", {"model": ToyDetector(4).state_dict()})
    run = HatContext(make_plugin_manager(only={"toy", "coco"})).load(recipe)
    n = infer_image(run, shapes_root / "val2017" / "000000000003.jpg", tmp_path / "o.png",
                    "float", score_thr=0.0)
    assert n == 1
    out = cv2.imread(str(tmp_path / "o.png"))
    orig = cv2.imread(str(shapes_root / "val2017" / "000000000003.jpg"))
    assert out.shape == orig.shape and np.abs(out.astype(int) - orig).max() > 100
