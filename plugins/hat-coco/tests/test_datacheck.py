"""`hat data check` and what the packer and the loader drop, on a hand-made COCO set."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from hat_coco.datacheck import check_json
from hat_coco.datasets import CocoDataset, load_coco_json, records_from_coco
from hat_coco.lmdb_store import CocoLmdbDataset, pack


def _image(path: Path, h: int, w: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((h, w, 3), 127, np.uint8))


# Image 1 (100 x 200) holds one annotation of each kind; ids say what each is.
ANNS = [
    (1, [10, 10, 10, 10], 1),      # kept, area 100: small
    (2, [20, 20, 50, 40], 2),      # kept, area 2000: medium
    (3, [0, 0, 120, 90], 1),       # kept, area 10800: large
    (4, [5, 5, 10, 10], 7),        # unknown category
    (5, [5, 5, 0, 10], 1),         # zero width
    (6, [5, 5, 10, -3], 2),        # negative height
    (7, [300, 10, 20, 20], 1),     # right of the 200 px wide image
    (8, [-30, 10, 20, 20], 1),     # left of it
    (9, [190, 90, 30, 30], 2),     # partly outside: kept, clipped to [190, 90, 200, 100]
]


def _coco(tmp_path: Path) -> dict:
    img = tmp_path / "images"
    _image(img / "one.png", 100, 200)
    _image(img / "two.png", 50, 60)   # the JSON says 40 x 60: a size mismatch
    (img / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    images = [{"id": 1, "file_name": "one.png", "height": 100, "width": 200},
              {"id": 2, "file_name": "two.png", "height": 40, "width": 60},
              {"id": 3, "file_name": "gone.png", "height": 10, "width": 10},
              {"id": 4, "file_name": "bad.jpg", "height": 10, "width": 10}]
    anns = [{"id": i, "image_id": 1, "bbox": b, "category_id": c, "area": b[2] * b[3],
             "iscrowd": 0} for i, b, c in ANNS]
    anns.append({"id": 10, "image_id": 2, "bbox": [1, 1, 20, 20], "category_id": 1, "area": 400,
                 "iscrowd": 1})
    return {"images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}


def _write(tmp_path: Path, data: dict) -> Path:
    ann = tmp_path / "labels.json"
    ann.write_text(json.dumps(data))
    return ann


def test_check_counts_every_kind_of_problem(tmp_path: Path) -> None:
    data = _coco(tmp_path)
    data["images"].append({"id": 1, "file_name": "again.png", "height": 5, "width": 5})
    data["annotations"] += [
        {"id": 1, "image_id": 2, "bbox": [1, 1, 2, 2], "category_id": 1},   # duplicate ann id
        {"id": 11, "image_id": 99, "bbox": [1, 1, 2, 2], "category_id": 1},  # no such image
        {"id": 12, "image_id": 2, "bbox": [1, 2], "category_id": 1}]         # not 4 numbers
    rep = check_json(_write(tmp_path, data), tmp_path / "images").as_dict()
    errors = {k: v["count"] for k, v in rep["errors"].items()}
    assert errors == {"unknown_category": 1, "empty_box": 2, "outside_image": 2,
                      "bad_annotation": 1, "orphan_annotation": 1, "duplicate_image_id": 1,
                      "duplicate_ann_id": 1, "missing_image": 1, "corrupt_image": 1,
                      "size_mismatch": 1}
    assert {k: v["count"] for k, v in rep["warnings"].items()} == {"partly_outside": 1}
    assert rep["errors"]["unknown_category"]["examples"] == [
        "annotation 4 of image 1 (one.png): category_id 7, bbox [5, 5, 10, 10]"]
    assert "two.png: JSON 40x60 (h x w), image 50x60" in rep["errors"]["size_mismatch"]["examples"]
    # kept non-crowd boxes: 1, 2, 3, 9 and the duplicate-id one (area 4) on image 2
    assert rep["boxes_per_class"] == {"a": 3, "b": 2}
    assert rep["box_sizes"] == {"small": 3, "medium": 1, "large": 1}
    assert rep["crowd"] == 1 and rep["images"] == 4 and rep["images_without_boxes"] == 2
    assert rep["sqrt_area_histogram"]["0-8"] == 1 and rep["sqrt_area_histogram"]["96-128"] == 1


def test_loader_drops_and_clips_what_the_check_reports(tmp_path: Path) -> None:
    ann = _write(tmp_path, _coco(tmp_path))
    sample = CocoDataset(ann, tmp_path / "images", [])[0]
    assert sample["gt_boxes"].tolist() == [[10, 10, 20, 20], [20, 20, 70, 60], [0, 0, 120, 90],
                                           [190, 90, 200, 100]]
    assert sample["gt_labels"].tolist() == [0, 1, 0, 1]


def test_packer_reports_drops_in_meta_and_on_stderr(hat, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    ann = _write(tmp_path, _coco(tmp_path))
    data = load_coco_json(ann)
    meta = pack(records_from_coco(data, str(ann)), data["categories"], tmp_path / "images",
                tmp_path / "x_lmdb", source=str(ann), split="x", progress=False)
    assert meta["dropped"]["counts"] == {"unknown_category": 1, "empty_box": 2,
                                         "outside_image": 2}
    assert [e["ann_id"] for e in meta["dropped"]["examples"]] == [4, 5, 6, 7, 8]
    assert meta["size_mismatch"] == {"count": 1, "examples": [
        {"file_name": "two.png", "image_id": 2, "json": [40, 60], "image": [50, 60]}]}
    err = capsys.readouterr().err
    assert "2 annotation(s) dropped: its width or height is zero or negative" in err
    assert "annotation 7 of image 1 (one.png)" in err and "two.png: the JSON says 40x60" in err
    assert CocoLmdbDataset(tmp_path / "x_lmdb", []).meta["dropped"] == meta["dropped"]
    res = hat("info", tmp_path / "x_lmdb")
    assert "dropped by the loader: unknown_category 1, empty_box 2, outside_image 2" in res.stdout


def test_cli_check_exit_status_json_and_strict(hat, tmp_path: Path) -> None:
    ann = _write(tmp_path, _coco(tmp_path))
    res = hat("data", "check", ann, "--img-dir", tmp_path / "images")
    assert res.exit_code == 0, res.output
    assert re.search(r"unknown_category: 1 — its category_id is not in `categories`", res.stdout)
    assert "box sizes (COCO: area < 32², < 96², larger): small 2" in res.stdout
    res = hat("data", "check", ann, "--img-dir", tmp_path / "images", "--strict", "--json")
    assert res.exit_code == 2 and "8 error(s) in the data (--strict)" in res.stderr
    assert json.loads(res.stdout)[0]["errors"]["missing_image"]["examples"] == ["gone.png"]
    res = hat("data", "check", ann)  # no image folder: annotations only
    assert res.exit_code == 0 and "images: not checked (give --img-dir)" in res.stdout


@pytest.mark.parametrize(("content", "message"), [
    (None, "annotation file not found"),
    ("{not json", "not valid JSON"),
    ('{"images": []}', "not a COCO instances file"),
])
def test_cli_check_bad_inputs_are_named(hat, tmp_path: Path, content: str | None, message: str) -> None:
    ann = tmp_path / "x.json"
    if content is not None:
        ann.write_text(content)
    res = hat("data", "check", ann)
    assert res.exit_code == 2 and f"{ann}: {message}" in res.stderr
    assert "Traceback" not in res.output


def test_cli_check_lmdb_and_unknown_target(hat, tmp_path: Path, shapes_root: Path) -> None:
    res = hat("pack", "coco", "--src-data-dir", shapes_root, "--target-data-dir", tmp_path,
              "--split-name", "val")
    assert res.exit_code == 0, res.output
    res = hat("data", "check", tmp_path / "val_lmdb", "--strict")
    assert res.exit_code == 0, res.output
    gt = load_coco_json(shapes_root / "annotations" / "instances_val2017.json")
    assert f"images: 12 (0 without boxes), annotations: {len(gt['annotations'])}" in res.stdout
    assert "0 errors, 0 warnings" in res.stdout
    res = hat("data", "check", tmp_path)
    assert res.exit_code == 2 and "expected a recipe (.toml), an LMDB folder" in res.stderr


def test_duplicate_image_ids_are_refused_by_the_loader(hat, tmp_path: Path) -> None:
    data = _coco(tmp_path)
    data["images"].append({"id": 2, "file_name": "again.png", "height": 5, "width": 5})
    res = hat("pack", "coco", "--ann-file", _write(tmp_path, data), "--img-dir",
              tmp_path / "images", "--target-data-dir", tmp_path, "--split-name", "x")
    assert res.exit_code == 2 and "image id 2 appears twice in `images` (two.png, again.png)" \
        in res.stderr


def _rotated_set(tmp_path: Path, json_size: tuple[int, int], exif_jpeg: Any) -> Path:
    """One 40 x 100 (h x w) stored JPEG tagged 'rotate 90° clockwise', so shown 100 x 40."""
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "p.jpg").write_bytes(
        exif_jpeg(np.full((40, 100, 3), 90, np.uint8), 6))
    ann = tmp_path / "labels.json"
    ann.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "p.jpg", "height": json_size[0],
                    "width": json_size[1]}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 60, 20, 30],
                         "area": 600, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "thing"}]}))
    return ann


def test_dataset_keeps_boxes_in_the_displayed_orientation(tmp_path: Path, exif_jpeg) -> None:
    ann = _rotated_set(tmp_path, (100, 40), exif_jpeg)
    sample = CocoDataset(ann, tmp_path / "img", [])[0]
    assert sample["img"].shape == (100, 40, 3) and sample["meta"]["orig_size"] == (100, 40)
    assert sample["gt_boxes"].tolist() == [[5.0, 60.0, 25.0, 90.0]]  # inside the shown image
    rep = check_json(ann, tmp_path / "img").as_dict()
    assert rep["warnings"]["exif_rotated"]["count"] == 1 and rep["errors"] == {}


def test_check_flags_a_json_that_has_the_unrotated_size(tmp_path: Path, exif_jpeg) -> None:
    rep = check_json(_rotated_set(tmp_path, (40, 100), exif_jpeg), tmp_path / "img").as_dict()
    mismatch = rep["errors"]["size_mismatch"]
    assert mismatch["count"] == 1 and "unrotated" in mismatch["examples"][0]
