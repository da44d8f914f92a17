"""The LMDB road: pack, round trip, resume, damaged input, `hat pack` / `hat info`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import hat_coco.lmdb_store as store
import lmdb
import numpy as np
import pytest
from hat_coco import specs as S
from hat_coco.datasets import CocoDataset, load_coco_json, records_from_coco
from hat_coco.lmdb_store import CocoLmdbDataset, ann_key, close_readonly, describe_lmdb, pack
from hat_coco.plugin import build_dataset

from hatcore.errors import UserError

HAT = [sys.executable, "-c", "from hatcore.cli import main; main()"]


def _folder(root: Path, split: str = "val") -> CocoDataset:
    return CocoDataset(root / "annotations" / f"instances_{split}2017.json", root / f"{split}2017", [])


def _pack(root: Path, target: Path, **kw) -> dict:
    ann = root / "annotations" / "instances_val2017.json"
    data = load_coco_json(ann)
    return pack(records_from_coco(data, str(ann)), data["categories"], root / "val2017", target,
                source=str(ann), split="val", progress=False, **kw)


def test_round_trip_is_byte_identical_with_equal_annotations(tmp_path: Path,
                                                              shapes_root: Path) -> None:
    meta = _pack(shapes_root, tmp_path / "val_lmdb", map_size=1 << 16)  # tiny: must grow
    assert meta["complete"] and meta["count"] == 12 and meta["version"] == store.VERSION
    folder, packed = _folder(shapes_root), CocoLmdbDataset(tmp_path / "val_lmdb", [])
    assert packed.class_names == folder.class_names and packed.cat_ids == folder.cat_ids
    assert len(packed) == len(folder) == 12
    for i in range(len(folder)):
        assert packed.load_bytes(i) == folder.load_bytes(i)
        a, b = packed.raw_sample(i), folder.raw_sample(i)
        assert np.array_equal(a["img"], b["img"])
        assert np.array_equal(a["gt_boxes"], b["gt_boxes"])
        assert np.array_equal(a["gt_labels"], b["gt_labels"])
    assert packed.coco_gt() == folder.coco_gt()
    assert packed.raw_sample(0)["meta"]["source"] == {"lmdb": str(tmp_path / "val_lmdb"),
                                                      "key": "img/000000000001"}


def test_interrupted_pack_resumes_where_it_stopped(tmp_path: Path, shapes_root: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    real, calls = store._read_checked, []

    def flaky(img_dir: str, rec: dict):
        calls.append(rec["image_id"])
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real(img_dir, rec)

    monkeypatch.setattr(store, "_read_checked", flaky)
    with pytest.raises(KeyboardInterrupt):
        _pack(shapes_root, tmp_path / "val_lmdb", commit_every=4)
    with pytest.raises(UserError, match="interrupted; rerun `hat pack coco`"):
        CocoLmdbDataset(tmp_path / "val_lmdb", [])
    assert "INCOMPLETE" in describe_lmdb(tmp_path / "val_lmdb")
    calls.clear()
    meta = _pack(shapes_root, tmp_path / "val_lmdb", commit_every=4)
    assert calls == list(range(7, 13)), "the 6 images already in must not be read again"
    assert meta["complete"] and meta["count"] == 12
    packed = CocoLmdbDataset(tmp_path / "val_lmdb", [])
    assert packed.coco_gt() == _folder(shapes_root).coco_gt()


def test_corrupt_record_names_its_key_and_the_lmdb(tmp_path: Path, shapes_root: Path) -> None:
    target = tmp_path / "val_lmdb"
    _pack(shapes_root, target)
    close_readonly()
    env = lmdb.open(str(target))
    with env.begin(write=True) as txn:
        txn.put(ann_key(3), b"\xc1 not msgpack")
    env.close()
    with pytest.raises(UserError, match=rf"{target}: corrupt record 'ann/000000000003'"):
        CocoLmdbDataset(target, [])
    with pytest.raises(UserError, match="corrupt record 'ann/000000000003'"):
        describe_lmdb(target)


def test_corrupt_image_bytes_in_lmdb_are_reported(tmp_path: Path, shapes_root: Path) -> None:
    target = tmp_path / "val_lmdb"
    _pack(shapes_root, target)
    env = lmdb.open(str(target))
    with env.begin(write=True) as txn:
        txn.put(b"img/000000000002", b"\xff\xd8garbage")
    env.close()
    ds = CocoLmdbDataset(target, [])
    with pytest.raises(UserError, match=r"record 'img/000000000002': corrupt JPEG"):
        ds[1]
    with pytest.raises(UserError, match="'img/000000000002' fails its crc32 check"):
        describe_lmdb(target)


def test_coco_lmdb_packs_its_source_on_first_use(tmp_path: Path, shapes_root: Path) -> None:
    source = S.ShapesSpec(type="shapes", root=str(shapes_root), num_images=12, image_size=160)
    spec = S.CocoLmdbSpec(type="coco_lmdb", path=str(tmp_path / "val_lmdb"), source=source)
    ds = build_dataset(spec=spec, split="val", transforms=[])
    assert isinstance(ds, CocoLmdbDataset) and len(ds) == 12
    with pytest.raises(UserError, match="no such LMDB"):
        build_dataset(spec=S.CocoLmdbSpec(type="coco_lmdb", path=str(tmp_path / "x")),
                      split="val", transforms=[])


def test_cli_pack_skips_a_corrupt_jpeg_by_name_and_info_verifies(tmp_path: Path,
                                                                  shapes_root: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(shapes_root, src)
    bad = src / "val2017" / "000000000005.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    args = ["pack", "coco", "--src-data-dir", str(src), "--target-data-dir", str(tmp_path / "out"),
            "--split-name", "val"]
    strict = subprocess.run([*HAT, *args, "--strict"], capture_output=True, text=True, timeout=120)
    assert strict.returncode == 2 and "000000000005.jpg" in strict.stderr
    proc = subprocess.run([*HAT, *args, "--num-workers", "2"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "skipped" in proc.stderr and "000000000005.jpg" in proc.stderr
    assert "11 images packed, 1 skipped" in proc.stdout
    info = subprocess.run([*HAT, "info", str(tmp_path / "out" / "val_lmdb")], capture_output=True,
                          text=True, timeout=120)
    assert info.returncode == 0, info.stderr
    assert "hat-coco-lmdb v1 LMDB, complete, verified" in info.stdout
    assert "images: 11" in info.stdout and "skipped: 1" in info.stdout


def test_hook_describe_file_verifies_a_packed_lmdb_and_ignores_others(tmp_path: Path,
                                                                       shapes_root: Path) -> None:
    from hat_coco.plugin import describe_file

    _pack(shapes_root, tmp_path / "val_lmdb")
    text = describe_file(path=tmp_path / "val_lmdb")
    assert "verified" in text and "images: 12" in text and "circle, square, triangle, cross" in text
    assert describe_file(path=shapes_root / "val2017") is None
    other = lmdb.open(str(tmp_path / "other"))
    other.close()
    assert describe_file(path=tmp_path / "other") is None


def test_hook_register_commands_adds_pack_coco_and_infer() -> None:
    import click
    from hat_coco.plugin import register_commands

    root = click.Group("hat")
    register_commands(cli=root)
    assert "coco" in root.commands["pack"].commands and "infer" in root.commands


def test_lmdb_dataset_reads_in_forked_workers_after_the_main_process(tmp_path: Path,
                                                                     shapes_root: Path) -> None:
    import torch
    from hat_coco import transforms as T
    from torch.utils.data import DataLoader

    _pack(shapes_root, tmp_path / "val_lmdb")
    ds = CocoLmdbDataset(tmp_path / "val_lmdb", [T.ToTensor(to_yuv=False)])
    first = ds[0]["img"]  # the main process holds a handle when the workers fork
    dl = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=ds.collate_fn,
                    multiprocessing_context="fork")
    batches = list(dl)
    assert sum(len(b["meta"]) for b in batches) == 12
    assert torch.equal(batches[0]["img"][0, :, :160, :160], first)
