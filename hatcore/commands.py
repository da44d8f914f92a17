"""The core's own commands: plugins, run, predict, export, compile, info.

Registered by the built-in plugin (``hatcore.builtin.register_commands``), like any plugin's.
Every command receives the run context (``HatContext``) and loads its recipe through it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from hatcore import distributed as dist
from hatcore.context import HatContext, pass_hat
from hatcore.errors import UserError

recipe_arg = click.argument("recipe", type=click.Path(path_type=Path))
set_opt = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                       help="Override a recipe value, e.g. --set stages.float.epochs=2 "
                            "(values in TOML syntax; repeatable).")


class TableChoice(click.ParamType):
    """A stage (``rows=False``) or predict row (``rows=True``) of the installed stage table."""

    name = "stage"

    def __init__(self, rows: bool, extra: tuple[str, ...] = ()) -> None:
        self.rows, self.extra = rows, extra

    def choices(self, ctx: click.Context | None) -> list[str]:
        hat = ctx.find_object(HatContext) if ctx else None
        table = (hat or HatContext()).plugins.stage_table()
        return [*(table.rows if self.rows else table.names), *self.extra]

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        valid = self.choices(ctx)
        if value not in valid:
            self.fail(f"{value!r} is not one of {', '.join(valid)}", param, ctx)
        return value


def _finish(pipe: Any) -> None:
    from hatcore import report, summary

    if not dist.is_main():
        return
    if pipe.ran:
        summary.plot_curves(pipe)
        done = [r for r in pipe.table.rows if pipe.workdir.predict_metrics(r).is_file()]
        if done:
            best = "qat" if "qat" in done else done[-1]
            drawn = summary.draw_examples(pipe, best)
            if drawn:
                click.echo(f"vis: {len(drawn)} images with {best} detections in {drawn[0].parent}")
        compared = summary.draw_comparison(pipe)
        if compared:
            click.echo(f"vis: {len(compared)} images, ground truth beside the float and the "
                       f"deployed model, in {compared[0].parent}")
    result = summary.write(pipe)
    report.write(pipe.work_dir, pipe.hook)
    click.echo("")
    click.echo(summary.table(result))


@click.command("run")
@recipe_arg
@click.option("--stage", "stages", multiple=True, type=TableChoice(rows=False, extra=("predict",)),
              help="Run only this stage (repeatable): a stage of the table (`hat plugins` shows "
                   "plugins' stages; the core's: float, calibration, qat, export, compile) or "
                   "predict.")
@set_opt
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="Train on N processes (torchrun; gloo on CPU, nccl on CUDA).")
@pass_hat
def run_cmd(hat: HatContext, recipe: Path, stages: tuple[str, ...], overrides: tuple[str, ...],
            nproc: int) -> None:
    """Run every stage of RECIPE not yet done, then print the summary table.

    Stages: float → calibration → qat → export → compile (and any a plugin adds), then predict
    (COCO mAP) for float, calibration, qat, int_infer and align_bpu. A finished stage whose
    inputs are unchanged is skipped; an interrupted one resumes; a changed one is redone with
    everything after it.
    """
    import sys

    if nproc > 1 and dist.world_size() == 1:
        sys.exit(dist.launch(nproc, ["run", str(recipe), *sum((["--stage", s] for s in stages), []),
                                     *sum((["--set", o] for o in overrides), [])]))
    dist.init()
    pipe = hat.load(recipe, overrides)
    pipe.run(list(stages) or None)
    _finish(pipe)


@click.command("predict")
@recipe_arg
@click.option("--stage", type=TableChoice(rows=True), required=True,
              help="Which model to score: float, calibration, qat, int_infer, align_bpu (or a "
                   "plugin's row).")
@click.option("--ckpt", type=click.Path(path_type=Path), default=None,
              help="Score this checkpoint instead of the stage's best (trained stages).")
@set_opt
@pass_hat
def predict_cmd(hat: HatContext, recipe: Path, stage: str, ckpt: Path | None,
                overrides: tuple[str, ...]) -> None:
    """Score one stage's model on the validation set (COCO mAP); writes predict/STAGE/."""
    pipe = hat.load(recipe, overrides)
    result = pipe.score(stage, ckpt)
    click.echo(json.dumps(result.get("bbox", result), indent=2))


@click.command("export")
@recipe_arg
@set_opt
@pass_hat
def export_cmd(hat: HatContext, recipe: Path, overrides: tuple[str, ...]) -> None:
    """Export the quantized model of RECIPE into work_dir/export/ (the exporter's file)."""
    hat.load(recipe, overrides).run(["export"])


@click.command("compile")
@recipe_arg
@set_opt
@pass_hat
def compile_cmd(hat: HatContext, recipe: Path, overrides: tuple[str, ...]) -> None:
    """Check and compile the exported model into work_dir/compile/ (program + perf.json)."""
    hat.load(recipe, overrides).run(["compile"])


@click.command("report")
@click.argument("target", metavar="WORK_DIR|RECIPE", type=click.Path(path_type=Path))
@set_opt
@pass_hat
def report_cmd(hat: HatContext, target: Path, overrides: tuple[str, ...]) -> None:
    """Write WORK_DIR/report.html: one self-contained page of the run (no network needed).

    With a work dir, the page is made from its files alone (summary, logs, predict results,
    perf estimate, drawings already in vis/). With a RECIPE, the summary and the comparison
    drawings (ground truth, float and deployed model) are made again first.
    """
    from hatcore import report, summary

    if target.is_dir():
        work = target
        if not (work / "summary.json").is_file() and not (work / "recipe.resolved.json").is_file():
            raise UserError(f"{work}: not a HAT work dir (no summary.json or "
                            "recipe.resolved.json); give the work dir `hat run` wrote")
    elif target.is_file():
        pipe = hat.load(target, overrides)
        if not pipe.workdir.resolved.is_file():
            raise UserError(f"{pipe.work_dir}: nothing has run yet (run `hat run {target}`)")
        summary.draw_comparison(pipe)
        summary.write(pipe)
        work = pipe.work_dir
    else:
        raise UserError(f"{target}: no such work dir or recipe file")
    click.echo(str(report.write(work, hat.plugins.hook)))


@click.command("info")
@click.argument("file", type=click.Path(path_type=Path))
@pass_hat
def info_cmd(hat: HatContext, file: Path) -> None:
    """Describe and verify FILE: a checkpoint, or any file an installed plugin writes."""
    if not file.exists():
        raise UserError(f"{file}: no such file or folder")
    text = hat.plugins.hook.describe_file(path=file)
    if text is None:
        raise UserError(f"{file}: not a file any installed plugin recognises "
                        f"(`hat plugins` lists what is installed)")
    click.echo(text)


@click.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_hat
def plugins_cmd(hat: HatContext, as_json: bool) -> None:
    """List installed plugins: distribution, version, hooks, type names and stages."""
    plugins = hat.plugins
    rows = []
    stages_by_plugin = {name: [s.name for s in added]
                        for name, added in plugins.stages_by_plugin().items()}
    for name, info in plugins.info.items():
        types = [f"{c.kind}:{c.name}" + (" (default)" if c.default else "")
                 for c in plugins.registry.by_plugin(name)]
        rows.append({"name": name, "distribution": info.distribution, "version": info.version,
                     "hooks": info.hooks, "types": types, "stages": stages_by_plugin.get(name, [])})
    if as_json:
        click.echo(json.dumps({"plugins": rows, "failed": plugins.failed}, indent=2))
        return
    for row in rows:
        click.echo(f"{row['name']}  ({row['distribution']} {row['version']})")
        click.echo(f"  hooks: {', '.join(row['hooks']) or '-'}")
        click.echo(f"  types: {', '.join(row['types']) or '-'}")
        if row["stages"]:
            click.echo(f"  stages: {', '.join(row['stages'])}")
    for name, err in plugins.failed.items():
        click.echo(f"{name}  FAILED TO LOAD: {err}")


def _plugin_group() -> click.Group:
    from hatcore.scaffold import plugin_group

    return plugin_group


COMMANDS = (run_cmd, predict_cmd, export_cmd, compile_cmd, report_cmd, info_cmd, plugins_cmd,
            _plugin_group())
