"""The LMDB format of ``hat pack coco`` (docs/lmdb.md): packer, reader dataset, verifier.

Keys: ``__meta__`` (msgpack: format, version, categories, count, source, split, complete,
skipped, dropped, size_mismatch), and per image ``ann/{image_id:012d}`` (msgpack annotation
record with the crc32 of the image bytes) and ``img/{image_id:012d}`` (the original encoded
bytes, never re-encoded).
"""

from __future__ import annotations

import os
import sys
import zlib
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import lmdb
import msgpack

from hat_coco.datasets import (
    EXAMPLES_KEPT,
    DetectionDataset,
    Transform,
    describe_drops,
    dropped_annotations,
)
from hat_coco.decode import DecodeError, decode_rgb
from hatcore.errors import UserError

FORMAT = "hat-coco-lmdb"
VERSION = 1
META_KEY = b"__meta__"
_RECORD_FIELDS = ("image_id", "file_name", "height", "width", "ann_ids", "bboxes",
                  "category_ids", "iscrowd", "areas", "crc32")


_ENVS: dict[str, tuple[int, lmdb.Environment]] = {}


def open_readonly(path: str | Path) -> lmdb.Environment:
    """The process's one read-only handle on ``path`` (py-lmdb allows one per process and
    handles do not survive a fork, so a DataLoader worker opens its own)."""
    key = str(Path(path).resolve())
    pid, env = _ENVS.get(key, (-1, None))
    if env is not None and pid != os.getpid():
        env.close()  # inherited through fork: py-lmdb refuses a second open while it exists
        env = None
    if env is None:
        env = lmdb.open(str(path), readonly=True, lock=False, readahead=False, meminit=False,
                        max_readers=256)
        _ENVS[key] = (os.getpid(), env)
    return env


def close_readonly(path: str | Path | None = None) -> None:
    """Close the cached read-only handle(s), e.g. before writing to the LMDB again."""
    for key in [str(Path(path).resolve())] if path is not None else list(_ENVS):
        pid, env = _ENVS.pop(key, (-1, None))
        if env is not None and pid == os.getpid():
            env.close()


def ann_key(image_id: int) -> bytes:
    return b"ann/%012d" % image_id


def img_key(image_id: int) -> bytes:
    return b"img/%012d" % image_id


_Item = tuple[dict[str, Any], bytes | None, str, tuple[int, int]]


def _read_checked(img_dir: str, rec: dict[str, Any]) -> _Item:
    """Read and test-decode one image (runs in a packer worker): the record, the bytes (None
    when unusable), the error text ('' when fine) and the displayed (height, width)."""
    path = Path(img_dir) / rec["file_name"]
    try:
        data = path.read_bytes()
        shape = decode_rgb(data).shape[:2]
    except OSError as exc:
        return rec, None, f"{path}: cannot read ({exc.strerror})", (0, 0)
    except DecodeError as exc:
        return rec, None, f"{path}: {exc}", (0, 0)
    return rec, data, "", (int(shape[0]), int(shape[1]))


def _read_items(img_dir: str, records: list[dict[str, Any]], num_workers: int
                ) -> Iterator[_Item]:
    if num_workers <= 0:
        for rec in records:
            yield _read_checked(img_dir, rec)
        return
    with ProcessPoolExecutor(num_workers) as pool:
        yield from pool.map(_read_checked, [img_dir] * len(records), records, chunksize=8)


class _Writer:
    """Batches puts into transactions and doubles the map size whenever it fills."""

    def __init__(self, path: Path, map_size: int) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.env = lmdb.open(str(path), map_size=map_size, subdir=True, meminit=False)
        self.pending: list[tuple[bytes, bytes]] = []

    def put(self, key: bytes, value: bytes) -> None:
        self.pending.append((key, value))

    def commit(self) -> None:
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    for k, v in self.pending:
                        txn.put(k, v)
                break
            except lmdb.MapFullError:
                self.env.set_mapsize(self.env.info()["map_size"] * 2)
        self.pending.clear()


def read_meta(env: lmdb.Environment, path: Path | str) -> dict[str, Any] | None:
    with env.begin() as txn:
        raw = txn.get(META_KEY)
    if raw is None:
        return None
    try:
        meta = msgpack.unpackb(raw)
    except Exception as exc:
        raise UserError(f"{path}: corrupt record '__meta__' ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{path}: record '__meta__' is not a {FORMAT} meta record")
    return meta


def pack(records: list[dict[str, Any]], categories: list[dict[str, Any]], img_dir: str | Path,
         target: str | Path, *, source: str, split: str = "", num_workers: int = 0,
         strict: bool = False, map_size: int = 1 << 26, commit_every: int = 64,
         progress: bool = True) -> dict[str, Any]:
    """Pack COCO records (``datasets.records_from_coco``) and their images into ``target``.

    Resumable: images whose record is already in ``target`` are skipped. Missing or corrupt
    images are reported by file name and skipped (``strict``: the first one is an error).

    :returns: the meta record written.
    """
    from tqdm import tqdm

    target = Path(target)
    close_readonly(target)
    writer = _Writer(target, map_size)
    old = read_meta(writer.env, target)
    if old is not None and old.get("version") != VERSION:
        raise UserError(f"{target}: format version {old.get('version')} (this hat-coco writes "
                        f"{VERSION}); pack into a new folder")
    with writer.env.begin() as txn:
        done = {k for k, _ in txn.cursor() if k.startswith(b"ann/")}
    todo = [r for r in records if ann_key(r["image_id"]) not in done]
    drops = dropped_annotations(records, categories)
    mismatch = (old or {}).get("size_mismatch") or {"count": 0, "examples": []}
    meta: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "categories": categories, "source": source,
        "split": split, "count": len(done), "complete": False, "skipped": [],
        "dropped": drops, "size_mismatch": mismatch}
    writer.put(META_KEY, msgpack.packb(meta))
    writer.commit()
    skipped: list[str] = []
    bar = tqdm(total=len(records), initial=len(records) - len(todo), unit="img",
               desc=f"pack {target.name}", disable=not progress, dynamic_ncols=True)
    for line in describe_drops(drops):
        bar.write(line, file=sys.stderr)
    try:
        for n, (rec, data, err, shape) in enumerate(_read_items(str(img_dir), todo, num_workers),
                                                    1):
            bar.update(1)
            if data is None:
                if strict:
                    raise UserError(f"{err} (--strict: stopping; rerun without it to skip)")
                bar.write(f"skipped {err}", file=sys.stderr)
                skipped.append(rec["file_name"])
                continue
            if shape != (rec["height"], rec["width"]):
                _note_mismatch(mismatch, rec, shape, bar)
            writer.put(img_key(rec["image_id"]), data)
            writer.put(ann_key(rec["image_id"]),
                       msgpack.packb({**rec, "crc32": zlib.crc32(data)}))
            meta["count"] += 1
            if n % commit_every == 0:  # the meta record's count moves with the images
                writer.put(META_KEY, msgpack.packb(meta))
                writer.commit()
        meta.update(complete=True, skipped=skipped)
    finally:
        writer.put(META_KEY, msgpack.packb(meta))
        writer.commit()  # what is in stays in: a rerun resumes from here
        bar.close()
        writer.env.close()
    return meta


def _note_mismatch(mismatch: dict[str, Any], rec: dict[str, Any], shape: tuple[int, int],
                   bar: Any) -> None:
    mismatch["count"] += 1
    if len(mismatch["examples"]) < EXAMPLES_KEPT:
        mismatch["examples"].append({"file_name": rec["file_name"], "image_id": rec["image_id"],
                                     "json": [rec["height"], rec["width"]], "image": list(shape)})
        bar.write(f"warning: {rec['file_name']}: the JSON says {rec['height']}x{rec['width']} "
                  f"(h x w), the image is {shape[0]}x{shape[1]} as displayed; its boxes may "
                  f"be off (see `hat data check`)", file=sys.stderr)


def pack_dataset(dataset: Any, target: Path, num_workers: int = 0) -> dict[str, Any]:
    """Pack a folder-backed ``CocoDataset`` (all its images) into ``target``."""
    return pack(dataset.all_records, dataset.categories, dataset.img_dir, target,
                source=str(dataset.ann_file), num_workers=num_workers)


def unpack_record(raw: bytes | None, key: bytes, path: Path | str) -> dict[str, Any]:
    """One ``ann/...`` value -> its dict; a damaged one is an error naming key and LMDB."""
    name = key.decode()
    if raw is None:
        raise UserError(f"{path}: record {name!r} is missing")
    try:
        rec = msgpack.unpackb(raw)
    except Exception as exc:
        raise UserError(f"{path}: corrupt record {name!r} ({type(exc).__name__}: {exc})") from None
    if not isinstance(rec, dict) or any(f not in rec for f in _RECORD_FIELDS):
        raise UserError(f"{path}: corrupt record {name!r} (expected the fields "
                        f"{', '.join(_RECORD_FIELDS)})")
    return rec


class CocoLmdbDataset(DetectionDataset):
    """Reads an LMDB written by ``hat pack coco``; opens the environment once per process."""

    def __init__(self, path: str | Path, transforms: list[Transform], *,
                 skip_empty: bool = False) -> None:
        self.path = Path(path)
        if not (self.path / "data.mdb").is_file():
            raise UserError(f"{self.path}: not an LMDB folder (no data.mdb)")
        env = open_readonly(self.path)
        meta = read_meta(env, self.path)
        if meta is None:
            raise UserError(f"{self.path}: no '__meta__' record; not written by `hat pack coco`")
        if meta.get("version") != VERSION:
            raise UserError(f"{self.path}: format version {meta.get('version')}, this hat-coco "
                            f"reads {VERSION}; repack it with `hat pack coco`")
        if not meta.get("complete"):
            raise UserError(f"{self.path}: the pack was interrupted; rerun `hat pack coco` "
                            f"with the same arguments to finish it")
        records = []
        with env.begin() as txn:
            cur = txn.cursor()
            if cur.set_range(b"ann/"):
                for key, raw in cur:
                    if not key.startswith(b"ann/"):
                        break
                    records.append(unpack_record(raw, key, self.path))
        self.meta = meta
        super().__init__(records, meta["categories"], transforms, skip_empty=skip_empty)

    def load_bytes(self, index: int) -> bytes:
        key = img_key(self.records[index]["image_id"])
        with open_readonly(self.path).begin(buffers=False) as txn:
            data = txn.get(key)
        if data is None:
            raise UserError(f"{self.path}: record {key.decode()!r} is missing")
        return data

    def source(self, index: int) -> dict[str, str]:
        return {"lmdb": str(self.path), "key": img_key(self.records[index]["image_id"]).decode()}

    def describe(self, index: int) -> str:
        return f"{self.path}: record {img_key(self.records[index]['image_id']).decode()!r}"


def describe_lmdb(path: Path) -> str | None:
    """Verify every record of a hat-coco LMDB and describe it; None when not one."""
    if not (path.is_dir() and (path / "data.mdb").is_file()):
        return None
    env = open_readonly(path)
    meta = read_meta(env, path)
    if meta is None:
        return None
    n = nbytes = 0
    with env.begin(buffers=True) as txn:
        cur = txn.cursor()
        if cur.set_range(b"ann/"):
            for key, raw in cur:
                if not bytes(key).startswith(b"ann/"):
                    break
                rec = unpack_record(bytes(raw), bytes(key), path)
                ik = img_key(rec["image_id"])
                data = txn.get(ik)
                if data is None:
                    raise UserError(f"{path}: record {ik.decode()!r} is missing")
                if zlib.crc32(data) != rec["crc32"]:
                    raise UserError(f"{path}: record {ik.decode()!r} fails its crc32 check")
                n += 1
                nbytes += len(data)
    if n != meta["count"]:
        raise UserError(f"{path}: the meta record counts {meta['count']} images, found {n}")
    names = [c["name"] for c in meta["categories"]]
    shown = ", ".join(names[:10]) + (" ..." if len(names) > 10 else "")
    state = "complete" if meta["complete"] else "INCOMPLETE (rerun `hat pack coco`)"
    counts = (meta.get("dropped") or {}).get("counts")  # absent: packed by an older hat-coco
    dropped = ("not recorded" if counts is None else
               ", ".join(f"{k} {v}" for k, v in counts.items() if v) or "none")
    mismatch = (meta.get("size_mismatch") or {}).get("count", "not recorded")
    return "\n".join([
        f"{path}: {FORMAT} v{meta['version']} LMDB, {state}, verified",
        f"  images: {n} ({nbytes / 2**20:.1f} MiB encoded), skipped: {len(meta['skipped'])}",
        f"  split: {meta['split'] or '-'}, source: {meta['source']}",
        f"  categories ({len(names)}): {shown}",
        f"  annotations dropped by the loader: {dropped}; "
        f"images whose size disagrees with the JSON: {mismatch}",
    ])
