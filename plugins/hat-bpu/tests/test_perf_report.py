"""The device estimate as HTML (perf.html and report.html's section): per-block totals, the
frame overhead, layers sorted; quant-debug's worst layers in the report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hat_bpu.device import perf as P
from hat_bpu.report import sections


def _layer(name: str, ms: float, bound: str = "compute") -> dict:
    return {"name": name, "op": "conv", "out_shape": [1, 8, 4, 4], "ops": int(ms * 1e6),
            "weight_bytes": 0, "act_bytes": 0, "ddr_bytes": 2048, "utilisation": 0.5,
            "compute_ms": ms, "memory_ms": ms / 2, "time_ms": ms, "bound": bound}


PERF = {"march": "m1", "device": "a board", "input_shape": [1, 3, 64, 64], "latency_ms": 1.0,
        "fps": 1000.0, "gops_per_frame": 0.001, "ddr_bytes_per_frame": 4096,
        "layers": [_layer("backbone.stem.0", 0.1), _layer("backbone.stages.1.0.expand.0", 0.2),
                   _layer("backbone.stages.1.0.project.0", 0.05, "memory"),
                   _layer("interpolate_1", 0.05), _layer("neck.layers.0.td.1.dw", 0.3),
                   _layer("_hat_q.add_9", 0.1)]}


def test_blocks_and_frame_overhead() -> None:
    assert P.block_of("backbone.stages.1.0.expand.0") == "backbone.stages.1"
    assert P.block_of("neck.layers.0.td.1.dw") == "neck.layers.0"
    totals = {b["block"]: (b["layers"], round(b["time_ms"], 6)) for b in P.blocks(PERF)}
    # the bare function and the quantizer's add count in the block before them
    assert totals == {"neck.layers.0": (2, 0.4), "backbone.stages.1": (3, 0.3),
                      "backbone.stem.0": (1, 0.1)}
    assert [b["block"] for b in P.blocks(PERF)] == ["neck.layers.0", "backbone.stages.1",
                                                     "backbone.stem.0"]  # slowest first
    costs = P.frame_costs(PERF)
    assert costs["layers_ms"] == pytest.approx(0.8) and costs["overhead_ms"] == pytest.approx(0.2)


def test_perf_html_is_sorted_with_numbers_totals_and_the_overhead() -> None:
    page = P.to_html(PERF)
    assert "0.200 ms (20.0 %) the frame overhead" in page
    block_chart, layer_chart = re.findall(r"<svg.*?</svg>", page)[:2]
    labels = re.findall(r"text-anchor='end'>([^<]+)</text><rect", block_chart)
    assert labels == ["neck.layers.0", "backbone.stages.1", "(frame overhead)", "backbone.stem.0"]
    values = [float(v) for v in re.findall(r">([\d.]+) ms</text>", layer_chart)]
    assert values == sorted(values, reverse=True) and values[0] == 0.3  # numbers shown, sorted
    assert ">0.1<" in layer_chart or ">0.05<" in layer_chart  # an axis with ticks
    assert page.count("<tr><td class=num>") == 0 and page.count("<tr><td>") == 3 + 6  # all rows
    assert "class='sortable" in page


def test_report_sections_of_perf_and_quant_debug(tmp_path: Path) -> None:
    assert sections(tmp_path) == []
    (tmp_path / "compile").mkdir()
    (tmp_path / "compile" / "perf.json").write_text(json.dumps(PERF))
    rows = [{"layer": f"l{i}", "type": "conv", "dtype": "int8", "observer": "mse",
             "cosine": 0.99, "sqnr_db": float(30 - i), "max_err_lsb": 1.0, "flags": [],
             "order": i} for i in range(20)]
    rows[3]["flags"] = ["low SQNR"]
    (tmp_path / "quant_debug" / "qat").mkdir(parents=True)
    (tmp_path / "quant_debug" / "qat" / "quant_debug.json").write_text(
        json.dumps({"version": 1, "layers": rows}))
    found = {s.id: s for s in sections(tmp_path)}
    assert list(found) == ["perf", "quant_debug"]
    shown = re.findall(r"<tr><td>(l\d+)</td>", found["quant_debug"].html)
    assert shown == [f"l{i}" for i in range(19, 4, -1)]  # the 15 lowest SQNR, worst first
