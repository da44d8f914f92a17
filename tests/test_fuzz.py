"""Fuzzing (hypothesis): recipes, .hbir/.hbm files and LMDB records fail only with UserError.

Each reader is reached through its public entry point: ``load_recipe`` (with ``--set``
overrides), the ``describe_file`` hook (``hat info``), the ``load_deployed`` hook (``hat predict
--stage int_infer/align_bpu``) and the ``build_dataset`` hook's LMDB dataset. Inputs are random
bytes, damaged valid files, and valid containers whose JSON header is rewritten (the checksum
recomputed here from the layout in docs/formats.md, so the fuzzing reaches past it). The
examples are derandomized: the same inputs every run.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hatcore import quant
from hatcore.errors import RecipeError, UserError
from hatcore.plugins import Plugins, make_plugin_manager
from hatcore.recipe import CompileSpec, ExportSpec, QuantizeSpec, load_recipe, make_converter

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)


# --------------------------------------------------------------------------- recipes

RECIPE = """\
[task]
name = "toy"
work_dir = "runs/toy"

[model]
type = "toy_detector"

[data.train]
type = "toy_squares"
transforms = [{ type = "toy_flip" }]

[data.val]
type = "toy_squares"

[stages.float]
epochs = 2
optimizer = { lr = 0.05 }
schedule = { type = "cosine" }
"""

KEYS = ["task.name", "task.seed", "task.device", "task.deterministic", "model", "model.type",
        "model.width", "data.train", "data.train.type", "data.train.batch_size",
        "data.train.transforms", "data.train.transforms.0", "data.train.transforms.0.p",
        "data.val.length", "stages.float.epochs", "stages.float.optimizer",
        "stages.float.optimizer.lr", "stages.float.optimizer.type", "stages.float.schedule.by",
        "stages.float.checkpoint_every_iters", "stages.qat.frozen_bn", "stages", "predict.stages",
        "metric", "metric.type", "quantize.type", "nonsense.key", "task.name.deeper"]


def toml_value(v: Any) -> str:
    """A TOML inline value (arrays and inline tables) for ``--set KEY=VALUE``."""
    if v is None:
        return '""'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + " }"


@pytest.fixture(scope="module")
def toy() -> Plugins:
    return make_plugin_manager(only={"toy"})


@pytest.fixture(scope="module")
def recipe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz_recipe")


@FUZZ
@given(text=st.text(max_size=300) | st.sampled_from([RECIPE]).map(lambda r: r)
       | st.tuples(st.integers(0, len(RECIPE)), st.text(max_size=20)).map(
           lambda t: RECIPE[:t[0]] + t[1] + RECIPE[t[0]:]))
def test_fuzz_recipe_text_fails_only_with_recipe_error(recipe_dir: Path, toy: Plugins,
                                                       text: str) -> None:
    path = recipe_dir / "r.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        load_recipe(path, toy.registry)
    except RecipeError:
        pass


@FUZZ
@given(sets=st.lists(st.tuples(st.sampled_from(KEYS), json_values), min_size=1, max_size=3),
       raw=st.lists(st.text(max_size=30), max_size=2))
def test_fuzz_recipe_overrides_fail_only_with_recipe_error(recipe_dir: Path, toy: Plugins,
                                                           sets: list[Any], raw: list[str]) -> None:
    path = recipe_dir / "base.toml"
    path.write_text(RECIPE)
    overrides = [f"{k}={toml_value(v)}" for k, v in sets] + raw
    try:
        load_recipe(path, toy.registry, overrides)
    except RecipeError:
        pass


# --------------------------------------------------------------------------- .hbir / .hbm

PREFIX = struct.Struct("<8sIQ")  # docs/formats.md: magic, version, header length


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Plugins, dict[str, bytes]]:
    """A toy model exported and compiled through the hat-bpu hooks: the valid files."""
    pytest.importorskip("hat_bpu")
    from hat_toy.plugin import ToyDetector

    plugins = make_plugin_manager(only={"toy", "hat-bpu"})
    conv = make_converter(plugins.registry)
    torch.manual_seed(0)
    model = plugins.hook.quantize(model=ToyDetector().eval(), stage="calibration",
                                  spec=conv.structure({"type": "horizon", "observer": "minmax"},
                                                      QuantizeSpec), target=None)
    quant.set_mode(model, "observe")
    with torch.no_grad():
        model(torch.rand(4, 3, 32, 32) - 0.5)
    quant.set_mode(model, "fake_quant")
    out = tmp_path_factory.mktemp("fuzz_deployed")
    export = conv.structure({"type": "hbir", "input_shape": [1, 3, 32, 32]}, ExportSpec)
    assert plugins.hook.export(model=model.eval(), spec=export, path=out / "model.hbir",
                               example_input=torch.zeros(1, 3, 32, 32), target=None)
    compile_spec = conv.structure({"type": "hbm"}, CompileSpec)
    assert plugins.hook.compile(artifact=out / "model.hbir", spec=compile_spec, out_dir=out,
                                target=None)
    files = Valid(hbir=(out / "model.hbir").read_bytes(), hbm=(out / "model.hbm").read_bytes())
    return plugins, files


class Valid(dict):  # type: ignore[type-arg]
    """The valid files (a short repr keeps hypothesis' failure reports readable)."""

    def __repr__(self) -> str:
        return f"<valid {', '.join(self)} files>"


def read_both_ways(plugins: Plugins, path: Path, kind: str) -> None:
    """``hat info`` and the loader of the predict stage; UserError is the only allowed failure."""
    for call in (lambda: plugins.hook.describe_file(path=path),
                 lambda: plugins.hook.load_deployed(path=path, stage="int_infer" if kind == "hbir"
                                                    else "align_bpu")):
        try:
            call()
        except UserError:
            pass


def rewrite_header(data: bytes, header: dict[str, Any]) -> bytes:
    magic, version, head_len = PREFIX.unpack_from(data)
    body = data[PREFIX.size + head_len:]
    if isinstance(header, dict):
        header = dict(header, body_len=len(body), body_sha256=hashlib.sha256(body).hexdigest())
    head = json.dumps(header).encode()
    return PREFIX.pack(magic, version, len(head)) + head + body


def rewrite_program(data: bytes, header: dict[str, Any], program: Any) -> bytes:
    """An .hbm whose ``program`` section (docs/formats.md) is ``program``; the other sections
    move to the next 64-byte boundary after it, the header follows them."""
    magic, version, head_len = PREFIX.unpack_from(data)
    body = data[PREFIX.size + head_len:]
    prog = json.dumps(program).encode()
    prog += b"\0" * (-len(prog) % 64)
    sections, chunks = [], [prog]
    pos = len(prog)
    for sec in header["sections"]:
        if sec["name"] == "program":
            sections.append({**sec, "offset": 0, "length": len(json.dumps(program).encode())})
            continue
        chunk = body[sec["offset"]:sec["offset"] + sec["length"]]
        chunk += b"\0" * (-len(chunk) % 64)
        sections.append({**sec, "offset": pos})
        chunks.append(chunk)
        pos += len(chunk)
    new_body = b"".join(chunks)
    new_head = dict(header, sections=sections)
    return rewrite_header(PREFIX.pack(magic, version, head_len) + data[PREFIX.size:PREFIX.size
                                                                         + head_len] + new_body,
                          new_head)


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside a JSON header."""
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value[:3]):
            out += paths(v, (*prefix, i))
    return out


def replaced(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {**value, head: replaced(value[head], rest, new)}
    return [replaced(v, rest, new) if i == head else v for i, v in enumerate(value)]


@pytest.mark.parametrize("kind", ["hbir", "hbm"])
@FUZZ
@given(data=st.data())
def test_fuzz_hbir_and_hbm_readers_fail_only_with_user_error(deployed, tmp_path_factory, kind,
                                                             data) -> None:
    plugins, files = deployed
    good = files[kind]
    magic, version, head_len = PREFIX.unpack_from(good)
    header = json.loads(good[PREFIX.size:PREFIX.size + head_len])
    how = data.draw(st.sampled_from(["bytes", "flip", "truncate", "header", "prefix"]
                                    + (["program", "program"] if kind == "hbm" else [])))
    if how == "bytes":
        blob = data.draw(st.sampled_from([b"", magic])) + data.draw(st.binary(max_size=200))
    elif how == "flip":
        blob = bytearray(good)
        for _ in range(data.draw(st.integers(1, 4))):
            blob[data.draw(st.integers(0, len(good) - 1))] ^= data.draw(st.integers(1, 255))
        blob = bytes(blob)
    elif how == "truncate":
        blob = good[:data.draw(st.integers(0, len(good) - 1))]
    elif how == "prefix":  # version and header length fields
        blob = PREFIX.pack(magic, data.draw(st.integers(0, 2**32 - 1)),
                           data.draw(st.integers(0, 2**64 - 1))) + good[PREFIX.size:]
    elif how == "program":  # a well-formed .hbm whose program section says something else
        prog_sec = next(x for x in header["sections"] if x["name"] == "program")
        body = good[PREFIX.size + head_len:]
        program = json.loads(body[prog_sec["offset"]:prog_sec["offset"] + prog_sec["length"]])
        where = data.draw(st.sampled_from(paths(program)))
        blob = rewrite_program(good, header, replaced(program, where, data.draw(json_values)))
    else:  # a well-formed container whose header says something else
        where = data.draw(st.sampled_from(paths(header)))
        blob = rewrite_header(good, replaced(header, where, data.draw(json_values)))
    path = tmp_path_factory.mktemp("fuzz_file") / f"model.{kind}"
    path.write_bytes(blob)
    read_both_ways(plugins, path, kind)


# --------------------------------------------------------------------------- LMDB records

RECORD_FIELDS = {"image_id": 1, "file_name": "a.jpg", "height": 64, "width": 64, "ann_ids": [1],
                 "bboxes": [[1.0, 2.0, 10.0, 12.0]], "category_ids": [1], "iscrowd": [0],
                 "areas": [120.0], "crc32": 0}

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats()
    | st.text(max_size=8) | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=10)


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Plugins, Any, Path]:
    pytest.importorskip("hat_coco")
    plugins = make_plugin_manager(only={"hat-coco"})
    conv = make_converter(plugins.registry)
    from hatcore.recipe import DatasetSpec

    root = tmp_path_factory.mktemp("fuzz_lmdb")
    spec = conv.structure({"type": "coco_lmdb", "path": str(root / "val_lmdb"), "source": {
        "type": "shapes", "root": str(root / "shapes"), "num_images": 3, "image_size": 64}},
        DatasetSpec)
    ds = plugins.hook.build_dataset(spec=spec, split="val", transforms=[])
    assert len(ds) == 3
    return plugins, spec, root / "val_lmdb"


@FUZZ
@given(how=st.sampled_from(["record", "value", "bytes", "image", "meta"]), data=st.data())
def test_fuzz_lmdb_records_fail_only_with_user_error(packed, how: str, data: Any) -> None:
    import lmdb
    import msgpack
    from hat_coco.lmdb_store import close_readonly

    plugins, spec, path = packed
    close_readonly(path)
    env = lmdb.open(str(path))
    with env.begin(write=True) as txn:
        key = sorted(k for k, _ in txn.cursor() if k.startswith(b"ann/"))[1]
        old = {"ann": txn.get(key), "img": txn.get(b"img/" + key[4:]), "meta": txn.get(b"__meta__")}
        if how == "record":  # the right fields, any values
            field = data.draw(st.sampled_from(sorted(RECORD_FIELDS)))
            rec = {**msgpack.unpackb(old["ann"]), field: data.draw(msgpack_values)}
            txn.put(key, msgpack.packb(rec))
        elif how == "value":
            txn.put(key, msgpack.packb(data.draw(msgpack_values)))
        elif how == "bytes":
            txn.put(key, data.draw(st.binary(max_size=64)))
        elif how == "image":
            txn.put(b"img/" + key[4:], data.draw(st.binary(max_size=64)))
        else:
            meta = msgpack.unpackb(old["meta"])
            field = data.draw(st.sampled_from(sorted(meta)))
            txn.put(b"__meta__", msgpack.packb({**meta, field: data.draw(msgpack_values)}))
    env.close()
    try:
        for call in (lambda: plugins.hook.describe_file(path=path),
                     lambda: [s for s in plugins.hook.build_dataset(spec=spec, split="val",
                                                                    transforms=[])]):
            try:
                call()
            except UserError:
                pass
    finally:
        close_readonly(path)
        env = lmdb.open(str(path))
        with env.begin(write=True) as txn:
            txn.put(key, old["ann"])
            txn.put(b"img/" + key[4:], old["img"])
            txn.put(b"__meta__", old["meta"])
        env.close()


def test_the_rewriters_keep_an_unchanged_file_valid(deployed, tmp_path) -> None:
    """The header/program rewriting above reaches the readers past the checksum: rewritten
    without a change, the files are still read as valid."""
    plugins, files = deployed
    for kind, good in files.items():
        _, _, head_len = PREFIX.unpack_from(good)
        header = json.loads(good[PREFIX.size:PREFIX.size + head_len])
        blobs = [rewrite_header(good, header)]
        if kind == "hbm":
            sec = next(x for x in header["sections"] if x["name"] == "program")
            body = good[PREFIX.size + head_len:]
            blobs.append(rewrite_program(good, header, json.loads(
                body[sec["offset"]:sec["offset"] + sec["length"]])))
        for i, blob in enumerate(blobs):
            path = tmp_path / f"{i}.{kind}"
            path.write_bytes(blob)
            assert "checksum ok" in plugins.hook.describe_file(path=path)
            assert plugins.hook.load_deployed(path=path, stage="int_infer" if kind == "hbir"
                                              else "align_bpu") is not None
