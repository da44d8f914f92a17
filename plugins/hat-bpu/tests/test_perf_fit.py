"""The perf model's check beyond its calibration point (bench/bpu_perf_fit.py): the layer lists
estimate as the quantized, converted model does, and the least-squares fit recovers known knobs."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from deploy_fixtures import calibrate
from hat_bpu.device import perf
from hat_bpu.device.march import get_march
from hat_bpu.quant.convert import convert

BENCH = Path(__file__).resolve().parents[3] / "bench"


def _bench(name: str):  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


fit = _bench("bpu_perf_fit")


def test_a_layer_list_estimates_as_the_converted_model() -> None:
    """FcosB0Like traced, calibrated and converted by hat-bpu vs the same net as a layer list:
    the two graphs come from different code and must cost the same."""
    nets = _bench("bpu_deploy_nets")
    torch.manual_seed(0)
    x = torch.rand(1, 3, 128, 128) * 2 - 1
    graph = convert(calibrate(nets.FcosB0Like(), x), x)
    listed = fit.fcos_b0_standin(128).graph()
    for march in ("bayes-e", "bernoulli2"):
        a, b = perf.estimate(graph, get_march(march)), perf.estimate(listed, get_march(march))
        assert b["ops_per_frame"] == pytest.approx(a["ops_per_frame"], rel=0.01)
        assert b["latency_ms"] == pytest.approx(a["latency_ms"], rel=0.03), march


def test_the_layer_lists_have_the_published_parameter_counts() -> None:
    published = {"ResNet18": 11.69, "MobileNetV2": 3.5, "RepVGG-A0": 8.30, "RepVGG-B0": 14.33,
                 "MobileOne-S0": 2.1, "YOLOv8n": 3.2, "YOLOv8m": 25.9, "YOLOv5su": 9.1}
    for name, millions in published.items():
        assert fit.MODELS[name]().params / 1e6 == pytest.approx(millions, rel=0.03), name


def test_the_fit_recovers_known_knobs() -> None:
    """Latencies made by the perf model with chosen knobs: least squares from another start
    finds those knobs again."""
    truth = dataclasses.replace(get_march("bayes-e"), peak_utilisation=0.4,
                                depthwise_efficiency=0.2, layer_overhead_us=5.0,
                                frame_overhead_us=100.0)
    names = ["ResNet18", "MobileNetV2", "RepVGG-A0", "MobileOne-S1", "YOLOv8n", "MobileNetV1"]
    graphs = [fit.MODELS[n]().graph() for n in names]
    targets = [fit.predict(g, truth) for g in graphs]
    start = dataclasses.replace(truth, peak_utilisation=0.7, depthwise_efficiency=0.1,
                                layer_overhead_us=1.0, frame_overhead_us=300.0)
    got = fit.fit(graphs, targets, start)
    assert got.peak_utilisation == pytest.approx(0.4, rel=0.02)
    assert got.depthwise_efficiency == pytest.approx(0.2, rel=0.05)
    assert got.layer_overhead_us == pytest.approx(5.0, rel=0.05)
    assert got.frame_overhead_us == pytest.approx(100.0, rel=0.1)


def test_the_march_table_holds_the_fit() -> None:
    """march.py's bayes-e and bernoulli2 knobs are what the fit over the published points gives
    (rerun bench/bpu_perf_fit.py and update march.py when a point or the model changes)."""
    res = fit.run()
    for march, r in res["marches"].items():
        for knob, value in r["new_knobs"].items():  # to the fit's rounding
            assert r["march_py_knobs"][knob] == pytest.approx(value, rel=2e-3, abs=1e-3), knob
        assert r["held_out_new"]["mape_pct"] < r["held_out_old"]["mape_pct"], march
