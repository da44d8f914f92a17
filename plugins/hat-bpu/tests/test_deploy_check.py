"""Model checker, `hat check` / `hat perf`, and the whole deploy road in the real pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from example_net import SmallNet
from hat_bpu import plugin
from hat_bpu.device.checker import check
from hat_bpu.device.march import get_march
from torch import nn

from hatcore import hookimpl
from hatcore.errors import UserError
from hatcore.plugins import make_plugin_manager, set_plugins
from hatcore.quant import DeQuantStub, QuantStub
from hatcore.recipe import ModelSpec, option, spec
from hatcore.registry import Register


class BadNet(nn.Module):
    """A 9x9 conv (beyond bernoulli2's kernel limit) and a SiLU (no BPU kernel)."""

    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = QuantStub(scale=1 / 128), DeQuantStub()
        self.big = nn.Conv2d(3, 8, 9, 1, 4)
        self.act = nn.SiLU()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.dequant(self.head(self.act(self.big(self.quant(x))))),)


@spec
class BadSpec(ModelSpec):
    width: int = option(8, doc="unused")


class BadPlugin:
    @hookimpl
    def hat_components(self, register: Register) -> None:
        register("model", "bad_net", BadSpec, "a model the BPU cannot run")

    @hookimpl
    def build_model(self, spec: ModelSpec) -> nn.Module | None:
        return BadNet() if isinstance(spec, BadSpec) else None


def test_checker_lists_unsupported_layers() -> None:
    report = check(BadNet().eval(), get_march("bernoulli2"), torch.zeros(1, 3, 32, 32))
    assert not report["ok"]
    bad = {r["name"]: r["reason"] for r in report["ops"] if not r["ok"]}
    assert "kernel 9x9 > 7" in bad["big"]
    assert "SiLU" in bad["act"]
    assert "NOT SUPPORTED" in report["text"] and "head" in report["text"]
    good = check(SmallNet().eval(), get_march("bayes-e"), torch.zeros(1, 3, 32, 32))
    assert good["ok"] and "BPU" in good["text"]


def test_checker_tensor_size_and_missing_quantstub() -> None:
    big = check(SmallNet().eval(), get_march("bernoulli2"), torch.zeros(1, 3, 2048, 2048))
    assert not big["ok"] and "tensor" in big["text"]
    plain = nn.Sequential(nn.Conv2d(3, 4, 3))
    assert not check(plain, get_march("bayes"), torch.zeros(1, 3, 8, 8))["ok"]


def test_hook_check_model() -> None:
    spec_ = plugin.HbmCompileSpec(type="hbm")
    report = plugin.check_model(model=BadNet(), spec=spec_,
                                example_input=torch.zeros(1, 3, 16, 16),
                                target=plugin.BpuTargetSpec(type="bpu", march="bernoulli2"))
    assert report is not None and report["ok"] is False
    with pytest.raises(UserError, match="bayes-e"):
        plugin.check_model(model=BadNet(), spec=spec_, example_input=torch.zeros(1, 3, 8, 8),
                           target=plugin.BpuTargetSpec(type="bpu", march="x"))


RECIPE = """
[task]
name = "toy"
work_dir = "{work}"
device = "cpu"

[model]
type = "{model}"

[data.train]
type = "toy_squares"
length = 4
batch_size = 4

[data.val]
type = "toy_squares"
length = 4
batch_size = 2

[metric]
type = "toy_hits"

[stages.float]
epochs = 1

[stages.calibration]
batches = 1

[stages.qat]
enabled = false

[export]
input_shape = [1, 3, 32, 32]

[target]
march = "bayes-e"
"""


def _cli(tmp_path: Path, model: str, extra: list[tuple[str, object]] | None = None):  # type: ignore[no-untyped-def]
    pytest.importorskip("hat_toy")
    from hatcore import commands  # noqa: F401  (registers the core commands)
    from hatcore.cli import cli

    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE.format(work=tmp_path / "work", model=model))
    set_plugins(make_plugin_manager(only={"toy", "bpu"}, extra=extra))
    import click

    group = click.Group("hat")
    plugin.register_commands(cli=group)
    return cli, group, recipe


def test_hat_check_and_perf_commands(tmp_path: Path) -> None:
    cli, group, recipe = _cli(tmp_path, "bad_net", [("bad", BadPlugin())])
    try:
        res = CliRunner().invoke(group, ["check", str(recipe), "--march", "bernoulli2"])
        assert res.exit_code == 1 and "NOT SUPPORTED" in res.output
        recipe.write_text(recipe.read_text().replace("bad_net", "toy_detector"))
        ok = CliRunner().invoke(group, ["check", str(recipe)], catch_exceptions=False)
        assert ok.exit_code == 0 and "deployable" in ok.output
        sizes = []
        for shape in ("1,3,32,32", "1,3,64,64"):
            p = CliRunner().invoke(group, ["perf", str(recipe), "--json", "--input-shape", shape],
                                   catch_exceptions=False)
            assert p.exit_code == 0, p.output
            sizes.append(json.loads(p.output)["latency_ms"])
        assert sizes[1] > sizes[0]
        t = CliRunner().invoke(group, ["perf", str(recipe), "--march", "bernoulli2"],
                               catch_exceptions=False)
        assert "modelled device" in t.output
    finally:
        set_plugins(None)


def test_pipeline_export_compile_and_deployed_predict(tmp_path: Path) -> None:
    cli, group, recipe = _cli(tmp_path, "toy_detector")
    try:
        run = CliRunner().invoke(cli, ["run", str(recipe), "--stage", "float", "--stage",
                                       "calibration", "--stage", "export", "--stage", "compile"],
                                 catch_exceptions=False)
        assert run.exit_code == 0, run.output
        work = tmp_path / "work"
        assert (work / "export/model.hbir").is_file() and (work / "compile/perf.html").is_file()
        for stage in ("int_infer", "align_bpu"):
            pred = CliRunner().invoke(cli, ["predict", str(recipe), "--stage", stage],
                                      catch_exceptions=False)
            assert pred.exit_code == 0, pred.output
        info = CliRunner().invoke(cli, ["info", str(work / "compile/model.hbm")])
        assert info.exit_code == 0 and "checksum ok" in info.output
        (work / "compile/model.hbm").write_bytes((work / "compile/model.hbm").read_bytes()[:-3])
        bad = CliRunner().invoke(cli, ["info", str(work / "compile/model.hbm")])
        assert bad.exit_code == 2 and "Traceback" not in bad.output
    finally:
        set_plugins(None)
