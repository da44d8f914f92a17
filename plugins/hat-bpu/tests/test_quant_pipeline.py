"""The quantizer inside the real pipeline: float → calibration → QAT, then `hat quant-debug`."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner
from hat_bpu.plugin import register_commands

from hatcore.plugins import make_plugin_manager, set_plugins

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
batches = 2

[stages.qat]
epochs = 2
ema = true
optimizer = {{ lr = 0.01 }}

[quantize]
observer = "auto"
freeze_bn_epoch = 1
overrides = {{ "cls" = "int16" }}
"""


def test_float_calibration_qat_and_quant_debug(tmp_path: Path) -> None:
    pytest.importorskip("hat_toy")
    from hatcore import commands  # noqa: F401  (registers the core commands)
    from hatcore.cli import cli

    recipe = tmp_path / "toy.toml"
    recipe.write_text(RECIPE.format(work=tmp_path / "work"))
    set_plugins(make_plugin_manager(only={"toy", "bpu"}))
    try:
        run = CliRunner().invoke(cli, ["run", str(recipe), "--stage", "float", "--stage",
                                       "calibration", "--stage", "qat"], catch_exceptions=False)
        assert run.exit_code == 0, run.output
        state = torch.load(tmp_path / "work/qat/checkpoint-best.pt", weights_only=True)["model"]
        assert any(k.endswith("out_fq.scale") for k in state)
        group = click.Group("hat")  # a fresh group: the global cli stays untouched
        register_commands(cli=group)
        dbg = CliRunner().invoke(group, ["quant-debug", str(recipe), "--stage", "qat", "--integer"],
                                 catch_exceptions=False)
        assert dbg.exit_code == 0, dbg.output
    finally:
        set_plugins(None)
    report = json.loads((tmp_path / "work/quant_debug/qat/quant_debug.json").read_text())
    layers = {r["layer"]: r for r in report["layers"]}
    assert {"quant", "body.0", "body.3", "box", "cls"} <= set(layers)
    assert layers["cls"]["dtype"] == "int16"
    assert all(r["int_identical"] == 1.0 for r in report["layers"])  # exact eval
    assert "cosine" in dbg.output
