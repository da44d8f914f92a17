"""`hat convert yolo|voc` on small generated sets; boxes compared with ones set by hand."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from hat_coco.lmdb_store import CocoLmdbDataset

# file -> (stored h, w), boxes as (class index, x1, y1, x2, y2) in displayed pixels
IMAGES = {
    "a.jpg": ((120, 200), [(0, 10, 20, 60, 100), (2, 150, 0, 200, 30)]),
    "sub/b.png": ((90, 64), [(1, 0, 0, 64, 90)]),
    "c.jpg": ((50, 80), []),  # no label file at all: a background image
}
NAMES = ["cat", "dog", "bird"]


def _image(path: Path, h: int, w: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.random.default_rng(len(path.name)).integers(0, 255, (h, w, 3), np.uint8)
    assert cv2.imwrite(str(path), img)


def _yolo_set(root: Path) -> None:
    for name, ((h, w), boxes) in IMAGES.items():
        _image(root / "images" / "train" / name, h, w)
        if not boxes:
            continue
        txt = (root / "labels" / "train" / name).with_suffix(".txt")
        txt.parent.mkdir(parents=True, exist_ok=True)
        txt.write_text("".join(
            f"{c} {(x1 + x2) / 2 / w:.8f} {(y1 + y2) / 2 / h:.8f} {(x2 - x1) / w:.8f} "
            f"{(y2 - y1) / h:.8f}\n" for c, x1, y1, x2, y2 in boxes) + "\n")
    (root / "classes.txt").write_text("\n".join(NAMES) + "\n")


def _by_file(data: dict) -> dict[str, list[tuple[int, list[float]]]]:
    files = {im["id"]: im["file_name"] for im in data["images"]}
    out: dict[str, list] = {f: [] for f in files.values()}
    for a in data["annotations"]:
        out[files[a["image_id"]]].append((a["category_id"], a["bbox"]))
    return out


def test_yolo_folder_converts_packs_and_loads_with_the_hand_made_boxes(hat, tmp_path: Path) -> None:
    _yolo_set(tmp_path)
    img_dir = tmp_path / "images" / "train"
    out = tmp_path / "coco.json"
    res = hat("convert", "yolo", "--img-dir", img_dir, "--classes", tmp_path / "classes.txt",
              "--out", out)
    assert res.exit_code == 0, res.output
    assert "3 images, 3 boxes, 3 categories (without labels: 1)" in res.stdout
    data = json.loads(out.read_text())
    assert [c["name"] for c in data["categories"]] == NAMES
    assert {(im["file_name"], im["height"], im["width"]) for im in data["images"]} == {
        (f, h, w) for f, ((h, w), _) in IMAGES.items()}
    got = _by_file(data)
    for name, (_, boxes) in IMAGES.items():
        assert len(got[name]) == len(boxes)
        for (cid, bbox), (c, x1, y1, x2, y2) in zip(got[name], boxes, strict=True):
            assert cid == c + 1
            assert bbox == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=1e-4)

    res = hat("pack", "coco", "--ann-file", out, "--img-dir", img_dir,
              "--target-data-dir", tmp_path / "lmdb", "--split-name", "mine")
    assert res.exit_code == 0, res.output
    ds = CocoLmdbDataset(tmp_path / "lmdb" / "mine_lmdb", [])
    assert ds.meta["split"] == "mine" and ds.class_names == NAMES
    for i in range(len(ds)):
        s = ds[i]
        want = [[x1, y1, x2, y2] for _, x1, y1, x2, y2 in IMAGES[s["meta"]["file_name"]][1]]
        assert np.allclose(s["gt_boxes"].reshape(-1, 4), np.reshape(want, (-1, 4)), atol=1e-3)


def test_yolo_coordinates_are_relative_to_the_displayed_image(hat, tmp_path: Path, exif_jpeg) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "p.jpg").write_bytes(
        exif_jpeg(np.zeros((40, 100, 3), np.uint8), 6))  # shown 100 x 40
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "p.txt").write_text("0 0.5 0.5 0.5 0.2\n")
    (tmp_path / "c.txt").write_text("thing\n")
    res = hat("convert", "yolo", "--img-dir", tmp_path / "images", "--classes", tmp_path / "c.txt",
              "--out", tmp_path / "o.json")
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "o.json").read_text())
    assert (data["images"][0]["height"], data["images"][0]["width"]) == (100, 40)
    assert data["annotations"][0]["bbox"] == pytest.approx([10, 40, 20, 20])


@pytest.mark.parametrize(("line", "message"), [
    ("3 0.5 0.5 0.1 0.1", "class 3 is not in the class list (0..2)"),
    ("0 0.5 0.5 0.1", "expected 'class cx cy w h' (5 numbers), got 4 fields"),
    ("0 0.5 x 0.1 0.1", "not numbers"),
])
def test_yolo_bad_label_lines_name_file_and_line(hat, tmp_path: Path, line: str, message: str) -> None:
    _yolo_set(tmp_path)
    txt = tmp_path / "labels" / "train" / "a.txt"
    txt.write_text(txt.read_text() + line + "\n")
    res = hat("convert", "yolo", "--img-dir", tmp_path / "images" / "train", "--classes",
              tmp_path / "classes.txt", "--out", tmp_path / "o.json")
    assert res.exit_code == 2 and f"{txt}:4: {message}" in res.stderr
    assert not (tmp_path / "o.json").exists()


VOC = {  # file -> (h, w, objects (name, xmin, ymin, xmax, ymax, difficult)), VOC's 1-based
    "2007_000001": (100, 150, [("dog", 1, 1, 50, 40, 0), ("cat", 101, 21, 150, 100, 1)]),
    "2007_000002": (80, 60, [("cat", 11, 31, 20, 40, 0)]),
}


def _voc_set(root: Path, sizes: bool = True) -> None:
    (root / "Annotations").mkdir(parents=True)
    for stem, (h, w, objs) in VOC.items():
        _image(root / "JPEGImages" / f"{stem}.jpg", h, w)
        size = f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size>" if sizes \
            else ""
        body = "".join(
            f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{x1}</xmin>"
            f"<ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
            for n, x1, y1, x2, y2, d in objs)
        (root / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><folder>VOC</folder><filename>{stem}.jpg</filename>{size}{body}"
            f"</annotation>")


@pytest.mark.parametrize("sizes", [True, False])
def test_voc_folder_converts_with_1_based_inclusive_boxes(hat, tmp_path: Path, sizes: bool) -> None:
    _voc_set(tmp_path, sizes)
    res = hat("convert", "voc", "--ann-dir", tmp_path / "Annotations", "--img-dir",
              tmp_path / "JPEGImages", "--out", tmp_path / "voc.json")
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "voc.json").read_text())
    assert [c["name"] for c in data["categories"]] == ["cat", "dog"]  # found, sorted
    ids = {"cat": 1, "dog": 2}
    assert {(im["file_name"], im["height"], im["width"]) for im in data["images"]} == {
        (f"{s}.jpg", h, w) for s, (h, w, _) in VOC.items()}
    got = {(a["category_id"], tuple(a["bbox"]), a["iscrowd"]) for a in data["annotations"]}
    # VOC pixel i (1-based) covers [i - 1, i]: xmin 1 .. xmax 50 is x 0..50, 50 px wide
    assert got == {(ids["dog"], (0, 0, 50, 40), 0), (ids["cat"], (100, 20, 50, 80), 1),
                   (ids["cat"], (10, 30, 10, 10), 0)}


def test_voc_image_set_classes_and_difficult_drop(hat, tmp_path: Path) -> None:
    _voc_set(tmp_path)
    (tmp_path / "val.txt").write_text("2007_000001\n")
    (tmp_path / "names.txt").write_text("dog\ncat\nbird\n")
    res = hat("convert", "voc", "--ann-dir", tmp_path / "Annotations", "--img-dir",
              tmp_path / "JPEGImages", "--image-set", tmp_path / "val.txt", "--classes",
              tmp_path / "names.txt", "--difficult", "drop", "--out", tmp_path / "v.json")
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "v.json").read_text())
    assert len(data["images"]) == 1 and [c["id"] for c in data["categories"]] == [1, 2, 3]
    assert [(a["category_id"], a["bbox"]) for a in data["annotations"]] == [(1, [0, 0, 50, 40])]


def test_voc_errors_name_the_file(hat, tmp_path: Path) -> None:
    _voc_set(tmp_path)
    (tmp_path / "names.txt").write_text("dog\n")
    args = ["convert", "voc", "--ann-dir", tmp_path / "Annotations", "--img-dir",
            tmp_path / "JPEGImages", "--out", tmp_path / "v.json"]
    res = hat(*args, "--classes", tmp_path / "names.txt")
    assert res.exit_code == 2 and "2007_000001.xml: object class 'cat' is not in the class list" \
        in res.stderr
    bad = tmp_path / "Annotations" / "2007_000002.xml"
    bad.write_text("<annotation><filename>x.jpg")
    res = hat(*args)
    assert res.exit_code == 2 and f"{bad}: not valid XML" in res.stderr
    assert "Traceback" not in res.output
