"""``hat check`` and ``hat perf``: the model checker and the perf model from a recipe alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import torch
from torch import nn

from hat_bpu.device import perf
from hat_bpu.device.march import MARCHES, get_march
from hatcore import quant
from hatcore.context import HatContext, pass_hat
from hatcore.errors import UserError


def _shape(text: str | None, default: list[int]) -> list[int]:
    if text is None:
        return list(default)
    try:
        shape = [int(v) for v in text.split(",")]
    except ValueError:
        shape = []
    if len(shape) != 4 or min(shape) <= 0:
        raise UserError(f"--input-shape {text!r}: expected N,C,H,W, e.g. 1,3,512,512")
    return shape


def integer_graph(pipe: Any, model: nn.Module, shape: list[int], march: str) -> Any:
    """The integer graph of ``model`` with its own (random) weights, calibrated on one random
    YUV input of ``shape`` through the recipe's ``[quantize]`` plugin."""
    from hat_bpu.quant.convert import convert

    if hasattr(pipe.recipe.target, "march"):
        pipe.recipe.target.march = march  # the quantizer models the march asked for
    qm = pipe.quantize(model.eval(), "calibration")
    x = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(0)).float()
    x = (x - 128) / 128
    quant.set_mode(qm, "observe")
    with torch.no_grad():
        qm(x)
    quant.set_mode(qm, "fake_quant")
    return convert(qm, x[:1], march=march)


def register(cli: click.Group) -> None:
    """Add ``check`` and ``perf`` to the ``hat`` command group."""
    from hat_bpu.device.checker import check

    march_opt = click.option("--march", type=click.Choice(MARCHES), default=None,
                             help="BPU architecture (default: the recipe's [target] march)")
    set_opt = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                           help="override a recipe value")

    @cli.command("check")
    @click.argument("recipe", type=click.Path(path_type=Path))
    @march_opt
    @click.option("--input-shape", default=None, help="N,C,H,W (default: [export] input_shape)")
    @set_opt
    @pass_hat
    def check_cmd(hat: HatContext, recipe: Path, march: str | None, input_shape: str | None,
                  overrides: tuple[str, ...]) -> None:
        """List every op of RECIPE's model as BPU / not supported (exit 1 on a failure)."""
        pipe = hat.load(recipe, overrides)
        m = get_march(march or pipe.section("target").march)
        shape = _shape(input_shape, pipe.section("export").input_shape)
        report = check(pipe.build_model().eval(), m, torch.zeros([1, *shape[1:]]))
        click.echo(report["text"])
        if not report["ok"]:
            raise SystemExit(1)

    @cli.command("perf")
    @click.argument("recipe", type=click.Path(path_type=Path))
    @march_opt
    @click.option("--input-shape", default=None, help="N,C,H,W (default: [export] input_shape)")
    @click.option("--json", "as_json", is_flag=True, help="print perf.json instead of the table")
    @click.option("--out", type=click.Path(path_type=Path), default=None,
                  help="also write perf.json and perf.html into this folder")
    @set_opt
    @pass_hat
    def perf_cmd(hat: HatContext, recipe: Path, march: str | None, input_shape: str | None,
                 as_json: bool, out: Path | None, overrides: tuple[str, ...]) -> None:
        """Estimated latency/FPS/DDR traffic of RECIPE's architecture (random weights) on a
        modelled BPU - estimates of a modelled device, not board measurements."""
        pipe = hat.load(recipe, overrides)
        name = march or pipe.section("target").march
        m = get_march(name)
        shape = _shape(input_shape, pipe.section("export").input_shape)
        graph = integer_graph(pipe, pipe.build_model(), shape, name)
        est = perf.estimate(graph, m)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / "perf.json").write_text(json.dumps(est, indent=1))
            (out / "perf.html").write_text(perf.to_html(est))
        click.echo(json.dumps(est, indent=1) if as_json else perf.table(est, top=25))
