"""`hat data browse`: ground truth drawn raw or after the transforms; labels never clipped."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from hat_coco import specs as S
from hat_coco.browse import browse, seen_sample
from hat_coco.datasets import CocoDataset
from hat_coco.draw import _colour, label_box
from hat_coco.plugin import build_transform

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(("anchor", "want"), [
    ((50, 40), (50, 28)),     # room above the box: the label sits on it
    ((50, 5), (50, 5)),       # no room above: just inside the box
    ((190, 40), (170, 28)),   # at the right border: shifted left to fit
    ((-10, -10), (0, 0)),     # box starting outside the image
    ((195, 99), (170, 87)),   # bottom-right corner
])
def test_label_box_keeps_the_label_on_the_image(anchor: tuple[int, int],
                                                want: tuple[int, int]) -> None:
    assert label_box(anchor, (30, 12), (100, 200)) == want  # text 30 x 12 on a 100 x 200 image


def _one_image_set(tmp_path: Path) -> CocoDataset:
    (tmp_path / "img").mkdir()
    assert cv2.imwrite(str(tmp_path / "img" / "p.png"), np.zeros((100, 200, 3), np.uint8))
    ann = tmp_path / "gt.json"
    ann.write_text(json.dumps({
        "images": [{"id": 7, "file_name": "p.png", "height": 100, "width": 200}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [40, 30, 100, 60],
                         "area": 6000, "iscrowd": 0},
                        {"id": 2, "image_id": 7, "category_id": 5, "bbox": [150, 0, 50, 20],
                         "area": 1000, "iscrowd": 0}],
        "categories": [{"id": 3, "name": "a-rather-long-name"}, {"id": 5, "name": "corner"}]}))
    transforms = [build_transform(spec=S.ResizeSpec(type="resize", img_scale=[50, 100])),
                  build_transform(spec=S.ToTensorSpec(type="to_tensor")),
                  build_transform(spec=S.NormalizeSpec(type="normalize"))]
    return CocoDataset(ann, tmp_path / "img", transforms)


def test_seen_sample_stops_before_the_tensor_encoding(tmp_path: Path) -> None:
    s = seen_sample(_one_image_set(tmp_path), 0)
    assert s["img"].shape == (50, 100, 3) and s["img"].dtype == np.uint8
    assert s["gt_boxes"].tolist() == [[20, 15, 70, 45], [75, 0, 100, 10]]  # the 100 x 200 halved


@pytest.mark.parametrize("raw", [True, False])
def test_browse_draws_boxes_where_the_ground_truth_is(tmp_path: Path, raw: bool) -> None:
    (path,) = browse(_one_image_set(tmp_path), tmp_path / "out", 5, raw)
    assert path.name == "0000_p.png"
    img = cv2.imread(str(path))
    scale = 1 if raw else 0.5
    assert img.shape == (int(100 * scale), int(200 * scale), 3)
    x1, y1, x2, y2 = (round(v * scale) for v in (40, 30, 140, 90))
    col = _colour(0)  # label 0: category 3
    for y, x in [(y1, (x1 + x2) // 2), (y2, (x1 + x2) // 2), ((y1 + y2) // 2, x1),
                 ((y1 + y2) // 2, x2)]:
        assert tuple(img[y, x]) == col
    assert (img[y2 + 2:, :] == 0).all(), "nothing drawn below the box"


def _recipe(tmp_path: Path, shapes_root: Path) -> Path:
    text = (REPO / "recipes" / "demo.toml").read_text()
    text = text.replace('path = "tmp_data/shapes/', f'path = "{tmp_path}/')
    text = text.replace("tmp_data/shapes", str(shapes_root)).replace('"runs/demo"',
                                                                      f'"{tmp_path}/run"')
    text = text.replace("num_images = 480, image_size = 320", "num_images = 24, image_size = 160")
    text = text.replace("num_images = 64, image_size = 320", "num_images = 12, image_size = 160")
    recipe = tmp_path / "r.toml"
    recipe.write_text(text)
    return recipe


def test_cli_browse_and_check_a_recipe(hat, tmp_path: Path, shapes_root: Path) -> None:
    recipe = _recipe(tmp_path, shapes_root)
    res = hat("data", "browse", recipe, "--split", "train", "--out", tmp_path / "b", "-n", 3)
    assert res.exit_code == 0, res.output
    seen = sorted((tmp_path / "b").glob("*.png"))
    assert len(seen) == 3 and all(cv2.imread(str(p)).shape == (192, 192, 3) for p in seen)
    res = hat("data", "browse", recipe, "--out", tmp_path / "r", "-n", 2, "--raw")
    assert res.exit_code == 0, res.output
    raw = sorted((tmp_path / "r").glob("*.png"))
    assert len(raw) == 2 and all(cv2.imread(str(p)).shape == (160, 160, 3) for p in raw)
    res = hat("data", "check", recipe, "--strict")
    assert res.exit_code == 0, res.output
    assert "[data.train]: " in res.stdout and "[data.val]: " in res.stdout
    res = hat("data", "browse", recipe, "--split", "test", "--out", tmp_path / "t")
    assert res.exit_code == 2 and "--split 'test'" in res.stderr
