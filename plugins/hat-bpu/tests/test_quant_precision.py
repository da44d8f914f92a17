"""Per-layer sensitivity and the int8/int16 search under a latency budget (issue 16)."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
import tomllib
import torch
from click.testing import CliRunner
from torch import nn

from hatcore import quant
from hatcore.quant import DeQuantStub, QuantStub

FRAGILE = "c3.0"  # a fused conv block is named after its conv


class Fragile(nn.Module):
    """Four conv-ReLU layers; ``c3`` has one output channel ~1000× the others (an outlier
    channel: in int8 its scale rounds the other channels to a few levels). ``c4`` reads the
    outlier channel with a tiny weight, so the output depends on the small channels."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.quant = QuantStub(scale=1 / 128)
        self.c1 = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1), nn.ReLU())
        self.c3 = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU())
        self.c4 = nn.Conv2d(8, 4, 3, 1, 1)
        self.dequant = DeQuantStub()
        with torch.no_grad():
            self.c3[0].weight[0] *= 1000.0
            self.c3[0].bias[0] = 50.0
            self.c4.weight[:, 0] *= 1e-4

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = self.quant(img)
        return self.dequant(self.c4(self.c3(self.c2(self.c1(x)))))


def _calibrated() -> tuple[nn.Module, list[torch.Tensor]]:
    from hat_bpu.plugin import HorizonQuantizeSpec, quantize_model

    g = torch.Generator().manual_seed(1)
    inputs = [torch.rand(2, 3, 16, 16, generator=g) * 2 - 1 for _ in range(2)]
    qm = quantize_model(Fragile().eval(), HorizonQuantizeSpec(type="horizon", observer="minmax"),
                        "calibration")
    qm.eval()
    quant.set_mode(qm, "observe")
    with torch.no_grad():
        for x in inputs:
            qm(x)
    quant.set_mode(qm, "fake_quant")
    return qm, inputs


def test_sensitivity_ranks_the_fragile_layer_first_and_int16_fixes_it(tmp_path: Path) -> None:
    from hat_bpu.quant.sensitivity import sensitivity, sqnr_score

    qm, inputs = _calibrated()
    calls = []

    def score(model):  # type: ignore[no-untyped-def]
        calls.append(1)
        return base(model)

    base = sqnr_score(inputs)
    rec = sensitivity(qm, score, tmp_path / "s.json", {"k": 1})
    assert rec["units"][0]["unit"] == FRAGILE, [(r["unit"], r["alone_loss"]) for r in rec["units"]]
    gains = {r["unit"]: r["int16_gain"] for r in rec["units"] if r["int16_gain"] is not None}
    assert max(gains, key=gains.__getitem__) == FRAGILE
    assert gains[FRAGILE] > 10  # dB: int16 at the same range resolves the small channels
    assert rec["float"] > rec["quantized"]
    # the float reverse (on by default): the fragile layer left float buys nothing, as its
    # output is still the int8 tensor c4 reads (a range problem of a tensor: int16 fixes it)
    row = next(r for r in rec["units"] if r["unit"] == FRAGILE)
    assert abs(row["float_gain"]) < 1 < 10 < row["int16_gain"], row
    # the model is back as it was: fake quant, the same outputs as before the measurement
    with torch.no_grad():
        again = sqnr_score(inputs)(qm)
    assert again == pytest.approx(rec["quantized"])
    # cached: a rerun measures nothing
    n = len(calls)
    rec2 = sensitivity(qm, score, tmp_path / "s.json", {"k": 1})
    assert len(calls) == n and rec2["units"] == rec["units"]
    sensitivity(qm, score, tmp_path / "s.json", {"k": 2})  # another key: measured again
    assert len(calls) > n


def _prepared_with(overrides: dict[str, str], inputs: list[torch.Tensor]) -> nn.Module:
    from hat_bpu.plugin import HorizonQuantizeSpec, quantize_model

    qm = quantize_model(Fragile().eval(), HorizonQuantizeSpec(
        type="horizon", observer="minmax", overrides=overrides), "calibration")
    qm.eval()
    quant.set_mode(qm, "observe")
    with torch.no_grad():
        for x in inputs:
            qm(x)
    quant.set_mode(qm, "fake_quant")
    return qm


def test_the_float_reverse_equals_a_model_prepared_with_that_layer_float() -> None:
    """``float_rest`` switches one unit to float in place; the same configuration prepared
    from the recipe's ``overrides = { unit = "float" }`` and calibrated from scratch scores
    the same output SQNR against an independently built float model."""
    from hat_bpu.quant.sensitivity import sensitivity, sqnr_db, sqnr_score

    qm, inputs = _calibrated()
    rec = sensitivity(qm, sqnr_score(inputs))
    ref = Fragile().eval()
    with torch.no_grad():
        want = [[ref(x).double()] for x in inputs]
        for r in rec["units"]:
            if r["type"] != "QConv2d":
                continue
            other = _prepared_with({r["unit"]: "float"}, inputs)
            got = [[other(x).double()] for x in inputs]
            assert sqnr_db(want, got) == pytest.approx(r["float_rest"], abs=1e-6), r["unit"]


def test_a_cached_report_without_the_float_reverse_measures_only_that(tmp_path: Path) -> None:
    from hat_bpu.quant.sensitivity import sensitivity, sqnr_score, units

    qm, inputs = _calibrated()
    calls = []
    base = sqnr_score(inputs)

    def score(model):  # type: ignore[no-untyped-def]
        calls.append(1)
        return base(model)

    cache = tmp_path / "s.json"
    rec = sensitivity(qm, score, cache, {"k": 1}, float_reverse=False)
    assert not any("float_rest" in r for r in rec["units"])
    n = len(calls)
    full = sensitivity(qm, score, cache, {"k": 1})  # the default adds the float reverse
    assert len(calls) - n == len(units(qm))  # one score per unit, nothing else remeasured
    assert [(r["unit"], r["alone"], r["int16"]) for r in full["units"]] == \
        [(r["unit"], r["alone"], r["int16"]) for r in rec["units"]]
    assert all(r["float_gain"] == r["float_rest"] - full["quantized"] for r in full["units"])
    n = len(calls)
    sensitivity(qm, score, cache, {"k": 1}, float_reverse=False)  # a superset serves it
    sensitivity(qm, score, cache, {"k": 1})
    assert len(calls) == n


def test_search_picks_the_fragile_layer_under_a_one_layer_budget_and_respects_it() -> None:
    from hat_bpu.device.march import get_march
    from hat_bpu.quant.convert import convert
    from hat_bpu.quant.precision import int16_costs, latency_ms, tune
    from hat_bpu.quant.sensitivity import sensitivity, sqnr_score

    qm, inputs = _calibrated()
    rec = sensitivity(qm, sqnr_score(inputs))
    graph = convert(qm, inputs[0][:1], march="bayes-e")
    march = get_march("bayes-e")
    units = [r["unit"] for r in rec["units"] if r["int16_gain"] is not None]
    costs = int16_costs(graph, march, units)
    assert all(c > 0 for c in costs.values()), costs  # int16 costs something on every layer
    base = latency_ms(graph, march, set())
    others = sorted(c for u, c in costs.items() if u != FRAGILE)
    budget = base + costs[FRAGILE] + 0.5 * others[0]  # room for the fragile layer, not two
    res = tune(rec, graph, march, budget)
    assert res["int16"] == [FRAGILE]
    assert res["latency_ms"] <= budget
    assert latency_ms(graph, march, set(res["int16"])) == res["latency_ms"]
    everything = tune(rec, graph, march, res["all_int16_latency_ms"] + 1e-6)
    assert set(everything["int16"]) == {u for u in units if rec_gain(rec, u) > 0}
    with pytest.raises(Exception, match="below the all-int8"):
        tune(rec, graph, march, base * 0.5)


def rec_gain(rec: dict, unit: str) -> float:  # type: ignore[type-arg]
    return next(r["int16_gain"] for r in rec["units"] if r["unit"] == unit)


def test_the_snippet_is_a_recipe_table_that_quantizes_the_choice_in_int16(tmp_path: Path) -> None:
    from hat_bpu.plugin import HorizonQuantizeSpec, quantize_model
    from hat_bpu.quant.precision import apply_to_recipe, overrides_for, snippet

    from hatcore.plugins import make_plugin_manager
    from hatcore.recipe import load_recipe

    over = overrides_for([FRAGILE], {"c1.0": "float", "c2.0": "int16"})
    assert list(over) == [FRAGILE, "c1.0", "*"]
    text = snippet(over, {"type": "horizon", "observer": "minmax"})
    recipe = tmp_path / "r.toml"
    recipe.write_text('[task]\nname = "t"\nwork_dir = "w"\n[model]\ntype = "toy_detector"\n'
                      '[data.val]\ntype = "toy_squares"\n' + text)
    pytest.importorskip("hat_toy")
    plugins = make_plugin_manager(only={"toy", "bpu"})
    spec = load_recipe(recipe, plugins.registry)[0].quantize
    assert isinstance(spec, HorizonQuantizeSpec) and spec.overrides == over
    qm = quantize_model(Fragile().eval(), spec, "calibration")
    dtypes = {n: getattr(m.out_fq, "dtype", None) for n, m in qm.qgraph.named_modules()
              if hasattr(m, "out_fq")}
    assert dtypes == {"c2.0": "int8", FRAGILE: "int16", "c4": "int8"}  # c1 stays float
    assert not any(n.startswith("c1") for n in dtypes)
    # --apply: the recipe's own [quantize] rewritten in place, comments kept
    src = ('# my recipe\n[task]\nname = "t"\n\n[quantize]\ntype = "horizon"\n'
           'overrides = { "c2.0" = "int16" }  # old\nobserver = "minmax"\n\n[export]\ntype = "hbir"\n')
    new = apply_to_recipe(src, over, Path("r.toml"))
    assert new.startswith("# my recipe\n") and "old" not in new
    assert tomllib.loads(new)["quantize"] == {"type": "horizon", "overrides": over,
                                              "observer": "minmax"}
    assert tomllib.loads(new)["export"] == {"type": "hbir"}


RECIPE = """
[task]
name = "toy"
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
length = 4
batch_size = 4

[metric]
type = "toy_hits"

[stages.float]
epochs = 1

[stages.calibration]
steps = 2

[quantize]
observer = "minmax"

[export]
input_shape = [1, 3, 32, 32]
"""


def test_quant_debug_sensitivity_and_tune_precision_commands(tmp_path: Path) -> None:
    pytest.importorskip("hat_toy")
    from hat_bpu.plugin import register_commands

    from hatcore import commands  # noqa: F401  (registers the core commands)
    from hatcore.cli import cli
    from hatcore.plugins import make_plugin_manager, set_plugins

    recipe = tmp_path / "toy.toml"
    recipe.write_text(RECIPE.format(work=tmp_path / "work"))
    set_plugins(make_plugin_manager(only={"toy", "bpu"}))
    try:
        run = CliRunner().invoke(cli, ["run", str(recipe), "--stage", "float", "--stage",
                                       "calibration"], catch_exceptions=False)
        assert run.exit_code == 0, run.output
        group = click.Group("hat")
        register_commands(cli=group)
        sens = CliRunner().invoke(group, ["quant-debug", str(recipe), "--sensitivity"],
                                  catch_exceptions=False)
        assert sens.exit_code == 0, sens.output
        assert "sensitivity [1/" in sens.output and "int16 gain" in sens.output
        assert "float gain" in sens.output  # the float reverse is the default
        again = CliRunner().invoke(group, ["quant-debug", str(recipe), "--sensitivity"],
                                   catch_exceptions=False)
        assert "sensitivity [" not in again.output  # cached: nothing measured
        out = tmp_path / "work/quant_debug/calibration"
        assert {"sensitivity.json", "sensitivity.txt"} <= {p.name for p in out.iterdir()}
        tuned = CliRunner().invoke(group, ["tune-precision", str(recipe), "--latency-budget-ms",
                                           "1000", "--apply"], catch_exceptions=False)
        assert tuned.exit_code == 0, tuned.output
        assert "[quantize]" in tuned.output and '"*" = "int8"' in tuned.output
        res = json.loads((out / "tune_precision.json").read_text())
        assert res["latency_ms"] <= 1000
        new = tmp_path / "toy.tuned.toml"
        over = tomllib.loads(new.read_text())["quantize"]["overrides"]
        assert over == res["overrides"] and list(over)[-1] == "*"
        low = CliRunner().invoke(group, ["tune-precision", str(recipe), "--latency-budget-ms",
                                         "0.000001"])
        assert low.exit_code != 0 and "below the all-int8" in str(low.exception)
    finally:
        set_plugins(None)
