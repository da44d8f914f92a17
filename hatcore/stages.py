"""THE stage table: every stage of ``hat run`` as one row, from which everything else derives.

A :class:`Stage` says its name, the recipe sections and upstream stages it reads (its
fingerprint), the files it writes, the function that runs it and the predict row that scores
what it made. ``hat run --stage`` choices, skip/resume, ``hat predict --stage`` choices and the
summary rows are all read from the table; nothing else lists stage names.

The core's five stages are registered by the built-in plugin through the ``hat_stages`` hook,
exactly as a plugin adds one (``after = "export"`` puts it behind the export stage)::

    float → calibration → qat → export → compile        predict rows: float, calibration, qat,
                                                                      int_infer, align_bpu
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from hatcore import quant
from hatcore.errors import UserError
from hatcore.workdir import CHECKPOINT_BEST, CHECKPOINT_LAST, LOG, METRICS

if TYPE_CHECKING:
    from torch import nn
    from torch.utils.data import DataLoader

    from hatcore.pipeline import Pipeline
    from hatcore.protocols import Runner
    from hatcore.recipe import Recipe

T = TypeVar("T")
Loader = Callable[["Pipeline", "Stage", "Path | None"], "tuple[nn.Module, Runner]"]


def _always(recipe: Recipe) -> bool:
    return True


@dataclass(frozen=True)
class Stage:
    """One row of the stage table.

    :param name: the stage's name: its folder under the work dir and its ``--stage`` choice.
    :param run: ``run(pipe, stage) -> dict | None`` does the work into ``pipe.workdir.stage(name)``;
        what it returns is recorded in ``stage.json``. Called only when the stage is not done.
    :param inputs: dotted paths into the resolved recipe (``"stages.float"``, ``"quantize"``)
        this stage reads; with ``needs`` they make its fingerprint.
    :param needs: upstream stages. A disabled upstream stage stands for its own first need, so
        ``export`` (needs ``qat``) exports the calibration model when QAT is off.
    :param artifacts: ``artifacts(recipe)`` the file names it writes, the primary one first (the
        one ``predict`` loads for a deployed stage).
    :param predict: the predict row scoring this stage's output (None: not scored).
    :param load: ``load(pipe, stage, ckpt) -> (model, runner)`` for the predict row: ``model``
        decodes (``postprocess``), ``runner(batch)`` computes the raw outputs.
    :param deployed: the predict row runs on the CPU (a deployed runner, not a torch model).
    :param enabled: ``enabled(recipe)``; a disabled stage is skipped and its row not scored.
    :param after: for plugin stages, the stage it follows (default: the end of the table).
    """

    name: str
    run: Callable[[Pipeline, Stage], dict[str, Any] | None]
    inputs: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()
    artifacts: Callable[[Recipe], Sequence[str]] = field(default=lambda recipe: ())
    predict: str | None = None
    load: Loader | None = None
    deployed: bool = False
    enabled: Callable[[Recipe], bool] = _always
    after: str | None = None


class StageTable:
    """The stages in run order, with lookups by stage and by predict row."""

    def __init__(self, stages: Iterable[Stage]) -> None:
        ordered: list[Stage] = []
        for st in stages:
            if any(s.name == st.name for s in ordered):
                raise UserError(f"two plugins add a stage named {st.name!r}")
            if st.after is None:
                ordered.append(st)
                continue
            pos = [i for i, s in enumerate(ordered) if s.name == st.after]
            if not pos:
                raise UserError(f"stage {st.name!r} wants to follow stage {st.after!r}, which no "
                                f"installed plugin provides; stages: {', '.join(self._n(ordered))}")
            ordered.insert(pos[0] + 1, st)
        self.stages = tuple(ordered)
        rows = [s.predict for s in ordered if s.predict]
        if len(set(rows)) != len(rows):
            raise UserError(f"two stages are scored by the same predict row: {rows}")

    @staticmethod
    def _n(stages: Iterable[Stage]) -> list[str]:
        return [s.name for s in stages]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.stages)

    @property
    def names(self) -> list[str]:
        return self._n(self.stages)

    @property
    def rows(self) -> list[str]:
        """The predict rows in table order (the summary's rows)."""
        return [s.predict for s in self.stages if s.predict]

    def __getitem__(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise UserError(f"{name!r} is not a stage; stages: {', '.join(self.names)}")

    def scored_by(self, row: str) -> Stage:
        """The stage whose output predict row ``row`` scores."""
        for s in self.stages:
            if s.predict == row:
                return s
        raise UserError(f"{row!r} is not a predict stage; valid: {', '.join(self.rows)}")


# --------------------------------------------------------------------------- the core's stages


def _train(pipe: Pipeline, stage: Stage, model: nn.Module, train_mode: str | None
           ) -> dict[str, Any]:
    from hatcore import distributed as dist
    from hatcore.trainer import Trainer

    cfg = getattr(pipe.recipe.stages, stage.name)
    trainer = Trainer(
        stage=stage.name, model=model, cfg=cfg,
        train_loader=pipe.loader("train", distributed=dist.world_size() > 1),
        out_dir=pipe.workdir.stage(stage.name), device=pipe.device,
        evaluate=pipe.evaluator(train_mode) if cfg.val_interval else None, best_key="AP",
        hook=pipe.hook, seed=pipe.recipe.task.seed,
    )
    return {"metrics": trainer.fit()}


def run_float(pipe: Pipeline, stage: Stage) -> dict[str, Any]:
    pipe.echo("float: training the floating-point model")
    return _train(pipe, stage, pipe.build_model(), None)


def calibration_loader(pipe: Pipeline) -> DataLoader[Any]:
    """The batches calibration observes, as HAT's calibration loader makes them: the training
    images (the validation set's where the recipe has none), by default with the validation
    transforms (``stages.calibration.transforms``), ``stages.calibration.batch_size`` per batch,
    shuffled from the task seed."""
    import torch
    from torch.utils.data import DataLoader

    cfg = pipe.recipe.stages.calibration
    split = "train" if pipe.recipe.data.train is not None else "val"
    spec = getattr(pipe.recipe.data, split)
    ds = pipe.call_owner("build_dataset", "dataset", spec, split=split,
                         transforms=pipe.build_transforms(cfg.transforms if split == "train"
                                                          else "val"))
    return DataLoader(ds, batch_size=cfg.batch_size or spec.batch_size, shuffle=True,
                      num_workers=spec.num_workers, collate_fn=getattr(ds, "collate_fn", None),
                      generator=torch.Generator().manual_seed(pipe.recipe.task.seed),
                      pin_memory=pipe.device.type == "cuda")


def run_calibration(pipe: Pipeline, stage: Stage) -> dict[str, Any]:
    from hatcore import distributed as dist
    from hatcore.checkpoint import save_checkpoint
    from hatcore.trainer import calibrate
    from hatcore.workdir import write_metrics

    cfg = pipe.recipe.stages.calibration
    model = pipe.quantize(pipe.load_stage_model(stage.needs[0]), "calibration")
    model.to(pipe.device).eval()
    loader = calibration_loader(pipe)
    pipe.echo(f"calibration: observing {cfg.num_steps} batches of {loader.batch_size} "
              f"({cfg.transforms} transforms)")
    quant.set_mode(model, "observe")
    done = calibrate(model, loader, batches=cfg.num_steps, device=pipe.device,
                     seed=pipe.recipe.task.seed)
    quant.set_mode(model, "fake_quant")
    if dist.is_main():  # scored by `predict calibration`, not twice
        payload = {"model": model.state_dict(), "stage": "calibration", "epoch": 0}
        save_checkpoint(pipe.workdir.checkpoint(stage.name, "last"), payload)
        save_checkpoint(pipe.workdir.checkpoint(stage.name, "best"), payload)
        write_metrics(pipe.workdir.metrics(stage.name), stage.name,
                      calibration={"batches": done, "batch_size": loader.batch_size,
                                   "transforms": cfg.transforms})
    return {}


def run_qat(pipe: Pipeline, stage: Stage) -> dict[str, Any]:
    from hatcore.checkpoint import load_checkpoint, load_model_state

    model = pipe.quantized_model(stage.name)
    path = pipe.stage_checkpoint(stage.needs[0])
    load_model_state(model, load_checkpoint(path)["model"], path)
    quant.set_mode(model, "qat")
    pipe.echo("qat: quantization-aware fine-tuning")
    return _train(pipe, stage, model, "qat")


def run_export(pipe: Pipeline, stage: Stage) -> dict[str, Any]:
    from hatcore.workdir import write_json

    source = pipe.source_of(stage)
    model = pipe.load_stage_model(source).cpu().eval()
    spec = pipe.section("export")
    path = pipe.artifact(stage.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    desc = pipe.call_owner("export", "exporter", spec, model=model, path=path,
                           example_input=pipe.example_input(), target=pipe.recipe.target)
    pipe.echo(f"export: wrote {path} from the {source} model in {time.perf_counter() - t0:.1f}s")
    write_json(pipe.workdir.stage(stage.name) / "export.json", desc)
    return {"source": source}


def run_compile(pipe: Pipeline, stage: Stage) -> dict[str, Any]:
    artifact = pipe.artifact(stage.needs[0])
    if not artifact.is_file():
        raise UserError(f"{artifact} does not exist: run `hat run {pipe.source} "
                        f"--stage {stage.needs[0]}` first")
    spec = pipe.section("compile")
    out = pipe.workdir.stage(stage.name)
    out.mkdir(parents=True, exist_ok=True)
    perf = pipe.call_owner("compile", "compiler", spec, artifact=artifact, out_dir=out,
                           target=pipe.recipe.target)
    target = perf.get("march", spec.type)
    pipe.echo(f"compile: {pipe.artifact(stage.name)} — estimated "
              f"{perf.get('latency_ms', float('nan')):.2f} ms/frame on {target} (modelled device)")
    return {"latency_ms": perf.get("latency_ms")}


def load_trained(pipe: Pipeline, stage: Stage, ckpt: Path | None) -> tuple[nn.Module, Runner]:
    """The predict model of a trained stage: its best weights (or ``ckpt``) in eval mode."""
    model = pipe.load_stage_model(stage.name, ckpt).to(pipe.device)
    return model, lambda batch: model(batch["img"])


def load_deployed(pipe: Pipeline, stage: Stage, ckpt: Path | None) -> tuple[nn.Module, Runner]:
    """The predict model of a deploy stage: the plugin's runner of its primary artifact."""
    if ckpt is not None:
        raise UserError(f"--ckpt applies to trained stages, not to {stage.predict}")
    artifact = pipe.artifact(stage.name)
    if not artifact.is_file():
        raise UserError(f"{artifact} does not exist: run `hat run {pipe.source} "
                        f"--stage {stage.name}` first")
    runner = pipe.hook.load_deployed(path=artifact, stage=stage.predict)
    if runner is None:
        raise UserError(f"no installed plugin runs {artifact} (`hat plugins` lists what is "
                        "installed)")
    return pipe.build_model().eval(), runner


def _need(section: T | None) -> T:
    if section is None:  # only for a disabled stage: Pipeline checks enabled ones' sections
        raise UserError("the stage's recipe section is missing")
    return section


def _quantized(recipe: Recipe) -> bool:
    return recipe.stages.calibration.enabled or recipe.stages.qat.enabled


TRAINED_FILES = (CHECKPOINT_BEST, CHECKPOINT_LAST, METRICS, LOG)

CORE_STAGES = (
    Stage("float", run_float, inputs=("task.seed", "model", "data", "metric", "stages.float"),
          artifacts=lambda r: TRAINED_FILES, predict="float", load=load_trained,
          enabled=lambda r: r.stages.float.enabled),
    Stage("calibration", run_calibration, inputs=("target.march", "quantize", "stages.calibration"),
          needs=("float",), artifacts=lambda r: (CHECKPOINT_BEST, CHECKPOINT_LAST, METRICS),
          predict="calibration", load=load_trained,
          enabled=lambda r: r.stages.calibration.enabled),
    Stage("qat", run_qat, inputs=("stages.qat",), needs=("calibration",),
          artifacts=lambda r: TRAINED_FILES, predict="qat", load=load_trained,
          enabled=lambda r: r.stages.qat.enabled),
    Stage("export", run_export, inputs=("target", "export"), needs=("qat",),
          artifacts=lambda r: (_need(r.export).artifact, "export.json"), predict="int_infer",
          load=load_deployed, deployed=True, enabled=_quantized),
    Stage("compile", run_compile, inputs=("target", "compile"), needs=("export",),
          artifacts=lambda r: (_need(r.compile).artifact, "perf.json", "perf.html"),
          predict="align_bpu",
          load=load_deployed, deployed=True, enabled=_quantized),
)
