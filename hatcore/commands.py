"""The core's own commands: run, predict, export, compile, info."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from hatcore import distributed as dist
from hatcore.cli import cli
from hatcore.errors import UserError
from hatcore.plugins import get_plugins
from hatcore.recipe import PREDICT_STAGES

recipe_arg = click.argument("recipe", type=click.Path(path_type=Path))
set_opt = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                       help="Override a recipe value, e.g. --set stages.float.epochs=2 "
                            "(values in TOML syntax; repeatable).")


def _pipeline(recipe: Path, overrides: tuple[str, ...]):  # type: ignore[no-untyped-def]
    from hatcore.pipeline import Pipeline
    from hatcore.stages import StageRunner

    if not recipe.is_file():
        raise UserError(f"{recipe}: no such recipe file")
    pipe = Pipeline.load(recipe, overrides)
    return pipe, StageRunner(pipe)


def _finish(pipe, runner, ran_anything: bool) -> None:  # type: ignore[no-untyped-def]
    from hatcore import summary

    if not dist.is_main():
        return
    if ran_anything:
        summary.plot_curves(pipe.work_dir)
        done = [s for s in PREDICT_STAGES if (pipe.work_dir / "predict" / s / "metrics.json").is_file()]
        if done:
            best = "qat" if "qat" in done else done[-1]
            drawn = summary.draw_examples(pipe, best)
            if drawn:
                click.echo(f"vis: {len(drawn)} images with {best} detections in {drawn[0].parent}")
    result = summary.write(pipe.work_dir)
    click.echo("")
    click.echo(summary.table(result))


@cli.command("run")
@recipe_arg
@click.option("--stage", "stages", multiple=True, metavar="STAGE",
              help="Run only this stage (repeatable): float, calibration, qat, export, compile, "
                   "predict.")
@set_opt
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="Train on N processes (torchrun; gloo on CPU, nccl on CUDA).")
def run_cmd(recipe: Path, stages: tuple[str, ...], overrides: tuple[str, ...], nproc: int) -> None:
    """Run every stage of RECIPE not yet done, then print the summary table.

    Stages: float → calibration → qat → export → compile, then predict (COCO mAP) for float,
    calibration, qat, int_infer and align_bpu. A finished stage whose inputs are unchanged is
    skipped; an interrupted one resumes; a changed one is redone with everything after it.
    """
    if nproc > 1 and dist.world_size() == 1:
        sys.exit(dist.launch(nproc, ["run", str(recipe), *sum((["--stage", s] for s in stages), []),
                                     *sum((["--set", o] for o in overrides), [])]))
    dist.init()
    pipe, runner = _pipeline(recipe, overrides)
    runner.run(list(stages) or None)
    _finish(pipe, runner, bool(runner.ran))


@cli.command("predict")
@recipe_arg
@click.option("--stage", type=click.Choice(PREDICT_STAGES), required=True,
              help="Which model to score.")
@click.option("--ckpt", type=click.Path(path_type=Path), default=None,
              help="Score this checkpoint instead of the stage's best (float/calibration/qat).")
@set_opt
def predict_cmd(recipe: Path, stage: str, ckpt: Path | None, overrides: tuple[str, ...]) -> None:
    """Score one stage's model on the validation set (COCO mAP); writes predict/STAGE/."""
    if ckpt is not None and stage in ("int_infer", "align_bpu"):
        raise UserError(f"--ckpt applies to float, calibration and qat, not {stage}")
    pipe, runner = _pipeline(recipe, overrides)
    result = runner.run_predict(stage, ckpt)
    click.echo(json.dumps(result.get("bbox", result), indent=2))


@cli.command("export")
@recipe_arg
@set_opt
def export_cmd(recipe: Path, overrides: tuple[str, ...]) -> None:
    """Export the quantized model of RECIPE to work_dir/export/model.hbir."""
    _pipeline(recipe, overrides)[1].run(["export"])


@cli.command("compile")
@recipe_arg
@set_opt
def compile_cmd(recipe: Path, overrides: tuple[str, ...]) -> None:
    """Check and compile work_dir/export/model.hbir to work_dir/compile/model.hbm (+ perf)."""
    _pipeline(recipe, overrides)[1].run(["compile"])


@cli.command("info")
@click.argument("file", type=click.Path(path_type=Path))
def info_cmd(file: Path) -> None:
    """Describe and verify FILE: a .hbir, .hbm, LMDB folder or checkpoint."""
    if not file.exists():
        raise UserError(f"{file}: no such file or folder")
    text = get_plugins().hook.describe_file(path=file)
    if text is None:
        raise UserError(f"{file}: not a file any installed plugin recognises "
                        f"(checkpoint .pt, .hbir, .hbm, LMDB folder)")
    click.echo(text)
