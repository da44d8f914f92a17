"""Compiler (.hbm), reference runtime, board input path and perf model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from deploy_fixtures import small_model, yuv_input
from hat_bpu import plugin
from hat_bpu.device import hbm, nv12, perf
from hat_bpu.device.march import get_march
from hat_bpu.device.runtime import Runtime
from hat_bpu.ir.simulator import Simulator
from hat_bpu.quant.convert import convert

from hatcore.errors import UserError


def _compiled(tmp_path: Path, march: str = "bayes-e", width: int = 16
              ) -> tuple[Path, torch.nn.Module]:
    q, x = small_model(width=width, pow2=get_march(march).pow2_scales)
    art = tmp_path / "model.hbir"
    target = plugin.BpuTargetSpec(type="bpu", march=march)
    plugin.export(model=q, spec=plugin.HbirExportSpec(type="hbir"), path=art,
                  example_input=x[:1], target=target)
    spec = plugin.HbmCompileSpec(type="hbm")
    res = plugin.compile(artifact=art, spec=spec, out_dir=tmp_path / "compile", target=target)
    assert res is not None and res["march"] == march
    return tmp_path / "compile" / "model.hbm", q


@pytest.mark.parametrize("march", ["bernoulli2", "bayes-e"])
def test_hook_compile_writes_hbm_and_perf(tmp_path: Path, march: str) -> None:
    path, _ = _compiled(tmp_path, march)
    data = json.loads((tmp_path / "compile" / "perf.json").read_text())
    for key in ("march", "input_shape", "latency_ms", "fps", "ops_per_frame",
                "ddr_bytes_per_frame", "layers"):
        assert key in data
    assert data["latency_ms"] > 0 and data["layers"]
    assert "<svg" in (tmp_path / "compile" / "perf.html").read_text()
    header, _ = hbm.load_hbm(path)
    assert header["march"] == march
    assert [s["name"] for s in header["sections"]] == ["program", "weights", "quant"]


def test_runtime_bit_exact_with_simulator(tmp_path: Path) -> None:
    path, _ = _compiled(tmp_path, width=20)  # 20 channels: padded to 32 in the .hbm
    rt = Runtime(path)
    sim = Simulator(hbm.hbir.load_hbir(tmp_path / "model.hbir"))
    x = yuv_input(3, 32, seed=3)
    for a, b in zip(rt(x), sim(x), strict=True):
        assert torch.equal(a, b)


def test_hook_load_deployed_align_bpu(tmp_path: Path) -> None:
    path, q = _compiled(tmp_path)
    runner = plugin.load_deployed(path=path, stage="align_bpu")
    assert runner is not None
    x = yuv_input(2, 32, seed=4)
    out = runner({"img": x})
    with torch.no_grad():
        ref = q(nv12.board_input(x))
    for a, b in zip(out, ref, strict=True):
        assert torch.equal(a, b)
    assert plugin.load_deployed(path=path, stage="int_infer") is None


def test_nv12_path_keeps_luma_and_subsamples_chroma() -> None:
    rgb = torch.randint(0, 256, (1, 3, 8, 8), generator=torch.Generator().manual_seed(1))
    x = (nv12.rgb_to_yuv(rgb.double()).float() - 128) / 128  # an in-gamut YUV image
    y = nv12.board_input(x)
    flat = torch.zeros_like(x)
    flat[:, 0] = 77
    flat[:, 1:] = 128  # a grey image survives the round trip exactly
    assert torch.equal(nv12.board_input((flat - 128) / 128), (flat - 128) / 128)
    assert float((y[:, 0] - x[:, 0]).abs().max()) * 128 <= 2  # luma close after RGB round trip
    uv = y[:, 1:]
    assert torch.equal(uv[..., ::2, :], uv[..., 1::2, :])  # 4:2:0: 2x2 chroma blocks
    assert torch.equal(uv[..., ::2], uv[..., 1::2])
    with pytest.raises(UserError, match="even"):
        nv12.rgb_to_nv12(torch.zeros(1, 3, 3, 4))


def test_hook_describe_file_hbm_refuses_damage(tmp_path: Path) -> None:
    path, _ = _compiled(tmp_path)
    text = plugin.describe_file(path=path)
    assert text is not None and "bayes-e" in text and "checksum ok" in text
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    (tmp_path / "t.hbm").write_bytes(bytes(data))
    with pytest.raises(UserError, match="checksum mismatch"):
        plugin.describe_file(path=tmp_path / "t.hbm")
    (tmp_path / "s.hbm").write_bytes(path.read_bytes()[:-7])
    with pytest.raises(UserError, match="truncated"):
        plugin.describe_file(path=tmp_path / "s.hbm")
    with pytest.raises(UserError, match="checksum mismatch|truncated"):
        Runtime(tmp_path / "t.hbm")


def test_perf_monotone_in_input_size_and_channels() -> None:
    march = get_march("bayes-e")
    lat = {}
    for width, size in [(16, 32), (16, 64), (32, 64)]:
        q, x = small_model(width=width, size=size)
        lat[(width, size)] = perf.estimate(convert(q, x[:1]), march)
    assert lat[(16, 64)]["latency_ms"] > lat[(16, 32)]["latency_ms"]
    assert lat[(32, 64)]["latency_ms"] > lat[(16, 64)]["latency_ms"]
    assert lat[(32, 64)]["ops_per_frame"] > lat[(16, 64)]["ops_per_frame"]
    assert lat[(16, 64)]["ddr_bytes_per_frame"] >= lat[(16, 32)]["ddr_bytes_per_frame"]
    assert "modelled device" in perf.table(lat[(16, 32)])


def test_op_table_march_rule_refuses_a_conv_beyond_the_kernel_limit() -> None:
    """The compiler reads the op table's rules: 3x3 convs and pools on a march limited to 1x1
    are refused, naming the node and the limit; the same graph passes the real march."""
    import dataclasses

    from hat_bpu.device.hbm import compile_graph
    from hat_bpu.ir.ops import OPS, check_graph

    q, x = small_model(width=8)
    graph = convert(q, x[:1], march="bayes-e")
    march = get_march("bayes-e")
    assert check_graph(graph, march, march.ops) == []
    tiny = dataclasses.replace(march, max_kernel=1)
    problems = check_graph(graph, tiny, tiny.ops)
    convs = {n.name for n in graph.nodes if n.op == "conv2d" and n.params["weight"].shape[-1] > 1}
    pools = {n.name for n in graph.nodes if n.op == "maxpool" and max(n.attrs["kernel"]) > 1}
    assert convs and pools and {p.split(":")[0] for p in problems} == convs | pools
    assert all("kernel 3x3 > 1" in p for p in problems if p.split(":")[0] in convs)
    used = sorted({n.op for n in graph.nodes} - {"conv2d", "quantize", "dequantize"})
    lacking = dataclasses.replace(march, ops=tuple(o for o in OPS if o != used[0]))
    assert any(f"op {used[0]!r} is not run" in p for p in check_graph(graph, lacking, lacking.ops))
    compile_graph(graph, "bayes-e")  # the real march compiles it
