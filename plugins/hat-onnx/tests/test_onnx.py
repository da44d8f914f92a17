"""hat-onnx: .hbir → ONNX (exact and QDQ forms), ORT vs the integer model, the pipeline stages.

The ``.hbir`` files are written by hat-bpu (the producer of the format); hat-onnx reads them
with its own reader. "A equals B" compares ONNX Runtime's execution of hat-onnx's graph with
hat-bpu's literal int64 reference (``run_ir``) and its fast simulator (``int_infer``): three
implementations, none sharing code with the other.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

pytest.importorskip("hat_bpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "hat-bpu" / "tests"))

from deploy_fixtures import small_model, yuv_input  # noqa: E402
from hat_bpu.ir.hbir import load_hbir, save_hbir  # noqa: E402
from hat_bpu.ir.reference import run_ir  # noqa: E402
from hat_bpu.ir.simulator import Simulator  # noqa: E402
from hat_bpu.quant.convert import convert  # noqa: E402
from hat_onnx import hbir, lower  # noqa: E402
from hat_onnx.plugin import convert_file  # noqa: E402
from hat_onnx.runtime import export_float, runner, session  # noqa: E402

from hatcore.errors import UserError  # noqa: E402


@pytest.fixture(scope="module")
def small(tmp_path_factory):  # type: ignore[no-untyped-def]
    """A calibrated SmallNet (every supported op, int8 and int16) saved as .hbir."""
    q, x = small_model(width=16, size=32)
    graph = convert(q, x[:1])
    path = tmp_path_factory.mktemp("hbir") / "small.hbir"
    save_hbir(graph, path)
    return path, graph, q


def _run_all(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    sess = session(model.SerializeToString())
    outs = sess.run(None, {sess.get_inputs()[0].name: x})
    return {o.name: v for o, v in zip(sess.get_outputs(), outs, strict=True)}


def _inner(g: hbir.Hbir) -> list[str]:
    return [t for t in g.tensors if t not in g.inputs and t not in g.outputs]


def test_reader_gives_the_graph_hat_bpu_wrote(small) -> None:
    path, graph, _ = small
    g = hbir.read_hbir(path)
    assert [n.op for n in g.nodes] == [n.op for n in graph.nodes]
    assert g.inputs == graph.inputs and g.outputs == graph.outputs
    for a, b in zip(g.nodes, graph.nodes, strict=True):
        assert set(a.params) == set(b.params)
        for k in a.params:
            assert a.params[k].dtype == b.params[k].dtype
            np.testing.assert_array_equal(a.params[k], b.params[k])
    assert {t.name: t.scale for t in g.tensors.values()} == \
        {t.name: t.scale for t in graph.tensors.values()}


def test_reader_refuses_a_tampered_file(small, tmp_path: Path) -> None:
    path, _, _ = small
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    bad = tmp_path / "bad.hbir"
    bad.write_bytes(bytes(data))
    with pytest.raises(UserError, match="checksum mismatch"):
        hbir.read_hbir(bad)
    (tmp_path / "short.hbir").write_bytes(bytes(data[:10]))
    with pytest.raises(UserError, match="truncated"):
        hbir.read_hbir(tmp_path / "short.hbir")


def test_int_form_is_bit_exact_on_every_tensor(small) -> None:
    """ORT on model.int.onnx == hat-bpu's int64 reference, every tensor, int8 and int16."""
    path, graph, _ = small
    g = hbir.read_hbir(path)
    model = lower.to_onnx(g, "int", expose=_inner(g))
    lower.check(model, g)
    x = yuv_input(3, 32, seed=7).numpy()  # batch 3: the batch dimension is dynamic
    env: dict[str, np.ndarray] = {}
    run_ir(graph, x, env)
    got = _run_all(model, x)
    dtypes = set()
    for name, v in got.items():
        t = g.tensors[name]
        dtypes.add(t.dtype)
        assert v.dtype == np.dtype(t.dtype), name  # int8/int16 tensors stay int8/int16 in ONNX
        np.testing.assert_array_equal(v, env[name].astype(v.dtype), err_msg=name)
    assert {"int8", "int16", "float32"} <= dtypes


def test_int_form_equals_int_infer_on_the_outputs(small) -> None:
    path, _, _ = small
    x = torch.from_numpy(yuv_input(2, 32, seed=3).numpy())
    sim = Simulator(load_hbir(path))
    ref = sim.run(x)
    convert_file(path, path.parent / "conv")
    got = _run_all(onnx.load(path.parent / "conv" / "model.int.onnx"), x.numpy())
    for name, r in zip(hbir.read_hbir(path).outputs, ref, strict=True):
        np.testing.assert_array_equal(got[name], r.numpy(), err_msg=name)


def test_qdq_form_agrees_within_the_goal(small) -> None:
    """QDQ (float scales, ORT's fused QLinear kernels): int8 ≥ 99 % identical, ≤ 1 LSB."""
    path, graph, _ = small
    g = hbir.read_hbir(path)
    x = yuv_input(4, 32, seed=11).numpy()
    env: dict[str, np.ndarray] = {}
    run_ir(graph, x, env)
    model = lower.to_onnx(g, "qdq", expose=_inner(g))
    lower.check(model, g)
    got = _run_all(model, x)
    for name, v in got.items():
        t = g.tensors[name]
        if t.dtype == "float32":
            continue
        d = np.abs(v.astype(np.int64) - env[name])
        assert (d == 0).mean() >= 0.99 and d.max() <= 1, (name, (d == 0).mean(), d.max())
    # the outputs alone (nothing exposed: ORT free to fuse), in LSB of the dequantized tensor
    plain = _run_all(lower.to_onnx(g, "qdq"), x)
    for name in g.outputs:
        src = graph.producer(name).inputs[0]
        d = np.abs(plain[name].astype(np.float64) - env[name]) / graph.tensors[src].scale
        assert (d < 0.5).mean() >= 0.99 and d.max() <= 1.01, name


def test_files_pass_the_checker_and_describe(small, tmp_path: Path) -> None:
    path, _, _ = small
    desc = convert_file(path, tmp_path)
    for name in ("model.int.onnx", "model.qdq.onnx"):
        m = onnx.load(tmp_path / name)
        onnx.checker.check_model(m, full_check=True)
        assert desc["files"][name]["nodes"] == len(m.graph.node)
    ops = desc["files"]["model.qdq.onnx"]["ops"]
    assert ops["QuantizeLinear"] and ops["DequantizeLinear"] and "BitwiseAnd" not in ops
    assert "ConvInteger" not in desc["files"]["model.int.onnx"]["ops"]
    from hat_onnx.plugin import describe_file

    text = describe_file(tmp_path / "model.int.onnx")
    assert "form int" in text and "onnx.checker ok" in text


def _rewrite(path: Path, out: Path, edit) -> None:  # type: ignore[no-untyped-def]
    """``path`` with its JSON header edited (body and checksum kept valid)."""
    data = path.read_bytes()
    magic, version, head_len = struct.unpack_from("<8sIQ", data)
    header = json.loads(data[20:20 + head_len])
    edit(header)
    head = json.dumps(header, sort_keys=True).encode()
    out.write_bytes(struct.pack("<8sIQ", magic, version, len(head)) + head + data[20 + head_len:])


def test_an_op_onnx_cannot_express_is_named(small, tmp_path: Path) -> None:
    path, _, _ = small

    def edit(h: dict) -> None:
        h["nodes"][4]["op"] = "roi_align"
        h["nodes"][4]["name"] = "head.roi"

    _rewrite(path, tmp_path / "odd.hbir", edit)
    with pytest.raises(lower.UnsupportedOp, match=r"node 'head.roi': op 'roi_align' has no ONNX"):
        convert_file(tmp_path / "odd.hbir", tmp_path / "out")
    assert not (tmp_path / "out" / "model.int.onnx").exists()


def test_long_int16_reduction_is_split_and_stays_exact() -> None:
    """A conv on int16 input with Σ|w| large: digits and channel chunks, still exact."""
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (4, 160, 3, 3)).astype(np.int8)
    g = hbir.Hbir(
        tensors={"x": hbir.Tensor("x", [1, 160, 6, 6], "float32", None),
                 "q": hbir.Tensor("q", [1, 160, 6, 6], "int16", 1 / 1000),
                 "y": hbir.Tensor("y", [1, 4, 6, 6], "int16", 0.5),
                 "o": hbir.Tensor("o", [1, 4, 6, 6], "float32", None)},
        nodes=[hbir.Node("quantize", "q", ["x"], ["q"], {}, {}),
               hbir.Node("conv2d", "c", ["q"], ["y"],
                         {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1,
                          "act": "none", "clip": None},
                         {"weight": w, "bias": rng.integers(-9999, 9999, 4).astype(np.int32),
                          "m": np.array([1518500250, 1 << 30, 2000000000, 1234567890]),
                          "shift": np.array([45, 44, 46, 45])}),
               hbir.Node("dequantize", "d", ["y"], ["o"], {}, {})],
        inputs=["x"], outputs=["o"], path="synthetic")
    model = lower.to_onnx(g, "int", expose=["q", "y"])
    assert sum(n.op_type == "Conv" for n in model.graph.node) > 2  # split: not one conv
    x = rng.uniform(-32, 32, (2, 160, 6, 6)).astype(np.float32)
    got = _run_all(model, x)
    q = got["q"].astype(np.int64)
    acc = torch.nn.functional.conv2d(torch.from_numpy(q).double(),
                                     torch.from_numpy(w.astype(np.float64)), padding=1).numpy()
    acc = acc.astype(np.int64) + g.nodes[1].params["bias"].astype(np.int64).reshape(1, -1, 1, 1)
    v = [int(a) * int(m) for a, m in zip(acc.ravel(), np.broadcast_to(
        g.nodes[1].params["m"].reshape(1, -1, 1, 1), acc.shape).ravel(), strict=True)]
    s = np.broadcast_to(g.nodes[1].params["shift"].reshape(1, -1, 1, 1), acc.shape).ravel()
    from fractions import Fraction

    ref = []
    for vi, si in zip(v, s, strict=True):
        r = round(Fraction(vi, 2 ** int(si)))  # Python rounds half to even
        ref.append(min(max(r, -32768), 32767))
    np.testing.assert_array_equal(got["y"].astype(np.int64).ravel(), np.array(ref))


def test_float_export_matches_the_model(tmp_path: Path) -> None:
    from example_net import SmallNet

    torch.manual_seed(0)
    net = SmallNet(width=8).eval()
    x = torch.from_numpy(yuv_input(2, 32, seed=1).numpy())
    export_float(net, x[:1], tmp_path / "f.onnx")
    raw = runner(tmp_path / "f.onnx")({"img": x})
    ref = net(x)
    assert isinstance(raw, tuple) and len(raw) == 2
    for a, b in zip(raw, ref, strict=True):
        assert float((a - b).abs().max().detach()) < 1e-4


PIPE = """
[task]
name = "t"
work_dir = "{work}"
device = "cpu"
[model]
type = "toy_detector"
[data.train]
type = "toy_squares"
length = 8
batch_size = 4
[data.val]
type = "toy_squares"
length = 8
batch_size = 4
[metric]
type = "toy_hits"
[stages.float]
epochs = 1
optimizer = {{ lr = 0.05 }}
val_interval = 0
[stages.calibration]
batches = 1
[stages.qat]
enabled = false
[export]
input_shape = [1, 3, 32, 32]
[predict]
vis_images = 0
"""


def test_pipeline_stages_rows_and_agreement(tmp_path: Path) -> None:
    """The onnx stages in a real run: files, predict rows, onnx_int == int_infer detections."""
    pytest.importorskip("hat_toy")
    from hatcore.pipeline import Pipeline
    from hatcore.plugins import make_plugin_manager

    plugins = make_plugin_manager(only={"toy", "bpu", "onnx"})
    recipe = tmp_path / "r.toml"
    recipe.write_text(PIPE.format(work=tmp_path / "w"))
    pipe = Pipeline.load(recipe, plugins=plugins)
    assert pipe.table.names.index("onnx") == pipe.table.names.index("export") + 1
    assert {"onnx_int", "onnx_float"} <= set(pipe.table.rows)
    pipe.run()
    work = tmp_path / "w"
    for rel in ("onnx/model.int.onnx", "onnx/model.qdq.onnx", "onnx/onnx.json",
                "onnx_float/model.float.onnx"):
        assert (work / rel).is_file(), rel
    for row in ("onnx_int", "onnx_float"):
        m = json.loads((work / "predict" / row / "metrics.json").read_text())
        assert m["schema"] == 1 and m["stage"] == row and "bbox" in m
    # the same detections as int_infer, batch by batch (bit-exact form)
    m_int, r_int = pipe.predictor("int_infer")
    m_onnx, r_onnx = pipe.predictor("onnx_int")
    batch = next(iter(pipe.loader("val")))
    a, b = r_int(batch), r_onnx(batch)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    from hatcore.summary import collect

    summary = collect(pipe)
    rows = [r["stage"] for r in summary["stages"]]
    assert rows.index("onnx_int") == rows.index("int_infer") + 1 and "onnx_float" in rows
    assert "onnx/model.int.onnx" in summary["artifacts"]
