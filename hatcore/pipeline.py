"""Runs the stage table (hatcore/stages.py): skip-if-done, resume, and the one predict loop.

Every stage writes into ``task.work_dir/<stage>/`` and records ``stage.json`` with the
fingerprint of everything it read (its recipe sections and its upstream stages' fingerprints).
A stage whose ``stage.json`` says done with the same fingerprint is skipped; a stage whose inputs
changed is redone from scratch (and so is everything after it, since their fingerprints chain);
a stage that was interrupted resumes (the trainer picks up ``checkpoint-last.pt``).

A :class:`Pipeline` is also the run context plugin commands receive (``HatContext.load``): it
builds a recipe's parts through the plugins and scores any stage.
"""

from __future__ import annotations

import gc
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import click
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from hatcore import distributed as dist
from hatcore import quant, runtime
from hatcore.checkpoint import load_checkpoint, load_model_state
from hatcore.data import Detections, TimedDataset, to_device
from hatcore.errors import RecipeError, UserError
from hatcore.plugins import Plugins, get_plugins
from hatcore.protocols import Metric, Runner, metric, task_model
from hatcore.recipe import (
    OPTIONAL_SECTIONS,
    SECTION_KINDS,
    Recipe,
    fingerprint,
    load_recipe,
    resolved,
)
from hatcore.stages import Stage
from hatcore.trainer import configure_determinism, seed_everything
from hatcore.workdir import (
    STAGE_STATE,
    WorkDir,
    flat_scores,
    metrics_record,
    read_json,
    write_json,
    write_metrics,
)

RECIPE_SECTIONS = SECTION_KINDS


def echo(msg: str) -> None:
    """A progress message (stderr, rank 0 only); results go to stdout."""
    if dist.is_main():
        click.echo(msg, err=True)


def _seed_worker(worker_id: int) -> None:
    import random

    import numpy as np

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class Pipeline:
    """One recipe's run: builds its parts through the plugins and runs its stage table."""

    echo = staticmethod(echo)

    def __init__(self, recipe: Recipe, raw: dict[str, Any], source: Path, plugins: Plugins,
                 overrides: tuple[str, ...] = ()) -> None:
        self.recipe, self.raw, self.source, self.plugins = recipe, raw, source, plugins
        self.overrides = overrides
        self.hook = plugins.hook
        self.workdir = WorkDir(Path(recipe.task.work_dir))
        self.work_dir = self.workdir.root
        self.table = plugins.stage_table()
        self._settle_predict_rows()
        self.device = self._device(recipe.task.device)
        configure_determinism(recipe.task.deterministic)
        self._datasets: dict[str, Dataset[Any]] = {}
        self.resolved = resolved(recipe, plugins.registry)
        self.fps = self._fingerprints()
        self.ran: list[str] = []  # stages (and predict/<row>) that did work in this invocation

    @classmethod
    def load(cls, path: str | Path, overrides: tuple[str, ...] | list[str] = (),
             plugins: Plugins | None = None) -> Pipeline:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no such recipe file")
        plugins = plugins or get_plugins()
        recipe, raw = load_recipe(path, plugins.registry, tuple(overrides))
        return cls(recipe, raw, path, plugins, tuple(overrides))

    @staticmethod
    def _device(name: str) -> torch.device:
        if name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"task.device = {name!r}, but CUDA is not available on this machine")
        return torch.device(name)

    def _settle_predict_rows(self) -> None:
        rows = self.recipe.predict.stages
        if not rows:  # default: every row of the table, written into recipe.resolved.json
            self.recipe.predict.stages = list(self.table.rows)
            return
        bad = [r for r in rows if r not in self.table.rows]
        if bad:
            raise RecipeError(str(self.source), [
                f"$.predict.stages: {r!r} is not a predict stage; valid: "
                f"{', '.join(self.table.rows)}" for r in bad])

    def check_sections(self, only: list[str] | None = None) -> None:
        """Every section the stages about to run read is there: else say so before any runs."""
        problems = []
        for stage in self.table:
            if not stage.enabled(self.recipe) or (only and stage.name not in only):
                continue
            for section in stage.inputs:
                top = section.split(".")[0]
                if top in RECIPE_SECTIONS and top not in OPTIONAL_SECTIONS \
                        and getattr(self.recipe, top) is None:
                    kind = RECIPE_SECTIONS[top]
                    problems.append(
                        f"$.{top}: the {stage.name} stage needs a {kind}, the recipe names none "
                        f"and no installed plugin provides a default one "
                        f"({self.plugins.registry.kind_hint(kind)}); install the plugin (and "
                        f"list its distribution in task.requires) or disable the stage")
        if problems:
            raise RecipeError(str(self.source), problems)

    # ------------------------------------------------------------------ building parts

    def need(self, result: Any, what: str, type_name: str) -> Any:
        if result is None:
            raise UserError(f"no installed plugin builds {what} type {type_name!r} "
                            f"(`hat plugins` lists what is installed)")
        return result

    def call_owner(self, hook: str, kind: str, spec: Any, **kwargs: Any) -> Any:
        """Call ``hook`` on the plugin that registered ``spec.type`` (see Plugins.call_owner)."""
        return self.plugins.call_owner(hook, kind, spec, **kwargs)

    def section(self, name: str) -> Any:
        """The recipe's ``[metric]``/``[quantize]``/``[export]``/``[compile]`` table."""
        value = getattr(self.recipe, name)
        if value is None:
            raise UserError(f"{self.source}: the recipe has no [{name}] table and no installed "
                            f"plugin provides a default {RECIPE_SECTIONS[name]}")
        return value

    def build_model(self) -> nn.Module:
        spec = self.recipe.model
        model = self.call_owner("build_model", "model", spec, plugins=self.plugins)
        if not isinstance(model, nn.Module):
            raise UserError(f"the model built for type {spec.type!r} is not a torch nn.Module")
        return model

    def build_transforms(self, split: str) -> list[Callable[[dict[str, Any]], dict[str, Any]]]:
        spec = self._data_spec(split)
        return [self.call_owner("build_transform", "transform", t) for t in spec.transforms]

    def _data_spec(self, split: str) -> Any:
        spec = getattr(self.recipe.data, split)
        if spec is None:
            raise UserError(f"{self.source}: the recipe has no [data.{split}] table")
        return spec

    def build_dataset(self, split: str) -> Dataset[Any]:
        if split not in self._datasets:
            spec = self._data_spec(split)
            self._datasets[split] = self.call_owner(
                "build_dataset", "dataset", spec, split=split,
                transforms=self.build_transforms(split))
        return self._datasets[split]

    def loader(self, split: str, *, distributed: bool = False) -> DataLoader[Any]:
        spec = self._data_spec(split)
        ds = self.build_dataset(split)
        shuffle = spec.shuffle if spec.shuffle is not None else split == "train"
        sampler = dist.train_sampler(ds, shuffle=shuffle, seed=self.recipe.task.seed) \
            if distributed else None
        gen = torch.Generator().manual_seed(self.recipe.task.seed)
        collate = getattr(ds, "collate_fn", None)
        if split == "train":  # each batch's making timed: the trainer's loader figures
            ds = TimedDataset(ds, collate)
            collate = ds.collate_fn
        return DataLoader(
            ds, batch_size=spec.batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
            num_workers=spec.num_workers, collate_fn=collate,
            worker_init_fn=_seed_worker, generator=gen, drop_last=split == "train",
            pin_memory=self.device.type == "cuda",
        )

    def build_metric(self) -> Metric:
        spec = self.section("metric")
        return metric(self.call_owner("build_metric", "metric", spec,
                                      dataset=self.build_dataset("val")))

    def example_input(self) -> torch.Tensor:
        return torch.zeros(self.section("export").input_shape)

    def quantize(self, model: nn.Module, stage: str) -> nn.Module:
        """``model`` prepared by the recipe's quantizer for ``stage`` (calibration or qat)."""
        prepared: nn.Module = self.call_owner("quantize", "quantizer", self.section("quantize"),
                                              model=model, stage=stage,
                                              target=self.recipe.target)
        return prepared

    def quantized_model(self, stage: str) -> nn.Module:
        """A freshly built model prepared by the quantizer for ``stage`` (weights not loaded)."""
        return self.quantize(self.build_model().eval(), stage)

    def stage_checkpoint(self, stage: str, which: str = "best") -> Path:
        path = self.workdir.checkpoint(stage, which)
        if not path.is_file():
            raise UserError(f"{path} does not exist: run `hat run {self.source} --stage {stage}` first")
        return path

    def load_stage_model(self, stage: str, ckpt: Path | None = None) -> nn.Module:
        """The model of a trained stage (float, calibration, qat), best weights, eval mode."""
        model = self.build_model() if stage == "float" else self.quantized_model(stage)
        path = ckpt or self.stage_checkpoint(stage)
        load_model_state(model, load_checkpoint(path)["model"], path)
        if stage != "float":
            quant.set_mode(model, "fake_quant")
        return model.eval()

    def artifact(self, stage: str) -> Path:
        """The primary file a stage writes (``export``: the exported model, per its plugin)."""
        names = list(self.table[stage].artifacts(self.recipe))
        if not names:
            raise UserError(f"stage {stage!r} declares no artifact")
        return self.workdir.stage(stage) / names[0]

    def source_of(self, stage: Stage) -> str:
        """The stage whose output ``stage`` reads: its first need, or that one's, when disabled."""
        name = stage.needs[0]
        while not self.table[name].enabled(self.recipe) and self.table[name].needs:
            name = self.table[name].needs[0]
        return name

    # ------------------------------------------------------------------ the one predict loop

    def predictor(self, row: str, ckpt: Path | None = None) -> tuple[nn.Module, Runner]:
        """``(model, runner)`` of predict row ``row``: ``runner(batch) -> raw``, the model decodes."""
        stage = self.table.scored_by(row)
        if stage.load is None:
            raise UserError(f"stage {stage.name!r} has no predict loader")
        return stage.load(self, stage, ckpt)

    def predict_device(self, row: str) -> torch.device:
        return torch.device("cpu") if self.table.scored_by(row).deployed else self.device

    @torch.no_grad()
    def predictions(self, model: nn.Module, runner: Runner | None,
                    batches: Iterable[dict[str, Any]], device: torch.device,
                    desc: str = "predict") -> Iterator[tuple[dict[str, Any], list[Detections]]]:
        """THE predict loop: ``(batch, detections)`` for each batch, the model in eval mode."""
        from hatcore.callbacks import progress

        task = task_model(model)
        run = runner or (lambda b: model(b["img"]))
        was_training = model.training
        model.eval()
        try:
            for batch in progress(batches, desc=desc, leave=False):
                batch = to_device(batch, device)
                yield batch, task.postprocess(run(batch), batch)
        finally:
            model.train(was_training)

    def evaluate(self, model: nn.Module, runner: Runner | None = None,
                 out_dir: Path | None = None, device: torch.device | None = None,
                 desc: str = "eval") -> dict[str, Any]:
        """Score ``runner`` (default: the model) on the val set with the recipe's metric.

        On several processes each scores its share of the val set (a ``DistributedSampler``,
        in order, padded by repeating images) and the metric gathers them (every process
        calls this; the metric's ``compute`` combines all processes' updates).
        """
        device = device or next(model.parameters(), torch.empty(0)).device
        scorer = self.build_metric()
        scorer.reset()
        val = self.loader("val", distributed=dist.world_size() > 1)
        for batch, dets in self.predictions(model, runner, val, device, desc):
            scorer.update(dets, batch)
        return scorer.compute(out_dir)

    def evaluator(self, train_mode: str | None = None) -> Callable[[nn.Module], dict[str, float]]:
        """Validation for the trainer: the flat scores of the model (fake-quant in QAT), the same
        on every process (each scores its share of the val set)."""
        def evaluate(model: nn.Module) -> dict[str, float]:
            if train_mode:
                quant.set_mode(model, "fake_quant")
            try:
                return flat_scores(self.evaluate(model, device=self.device))
            finally:
                if train_mode:
                    quant.set_mode(model, train_mode)
        return evaluate

    # ------------------------------------------------------------------ running the table

    def _fingerprints(self) -> dict[str, str]:
        def lookup(path: str) -> Any:
            node: Any = self.resolved
            for key in path.split("."):
                node = node.get(key) if isinstance(node, dict) else None
            return node

        fps: dict[str, str] = {}
        for stage in self.table:
            upstream = [fps[self.source_of(stage)]] if stage.needs else []
            upstream += [fps[n] for n in stage.needs[1:]]
            fps[stage.name] = fingerprint([[lookup(p) for p in stage.inputs], upstream])
            if stage.predict:
                fps[f"predict/{stage.predict}"] = fingerprint(
                    [fps[stage.name], lookup("data.val"), lookup("metric")])
        return fps

    def run(self, only: list[str] | None = None) -> None:
        """Every stage of the table not yet done (or only those named), then the predict rows."""
        valid = [*self.table.names, "predict"]
        for name in only or []:
            if name not in valid:
                raise UserError(f"--stage {name!r} is not a stage; valid: {', '.join(valid)}")
        self.check_sections(only)
        if dist.is_main():
            self._save_recipe()
        if not only or self.table.names[0] in only:
            self.check()
        for stage in self.table:
            if only and stage.name not in only:
                continue
            if not stage.enabled(self.recipe):
                echo(f"{stage.name}: disabled in the recipe, skipped")
            else:
                self.run_stage(stage)
            dist.barrier()
        if not only or "predict" in only:
            for row in self.recipe.predict.stages:
                if self.table.scored_by(row).enabled(self.recipe):
                    self.score(row)
            dist.barrier()

    def _save_recipe(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        text = self.source.read_text()
        if self.overrides:
            text += "\n# overridden on the command line:\n" + "".join(
                f"#   --set {o}\n" for o in self.overrides)
        self.workdir.recipe.write_text(text)
        write_json(self.workdir.resolved, {"source": str(self.source),
                                           "overrides": list(self.overrides),
                                           "recipe": self.resolved})

    def check(self) -> None:
        """The deploy checker (``check_model``), before any training, when a compiler has one."""
        spec = self.recipe.compile
        if spec is None or not self.table["compile"].enabled(self.recipe) \
                or not self.hook.check_model.get_hookimpls():
            return
        model = self.build_model().eval()
        report = self.plugins.call_owner("check_model", "compiler", spec, model=model,
                                         example_input=self.example_input(),
                                         target=self.recipe.target, required=False)
        if report is None:
            return
        target = report.get("target", spec.type)
        if not report.get("ok", False):
            raise UserError(f"the model cannot be deployed on {target}:\n{report.get('text', '')}"
                            "\nfix the model or choose another target before training")
        echo(f"check: the model is deployable on {target}")

    def require_current(self, names: Iterable[str], reader: str) -> None:
        """Refuse to run ``reader`` on an upstream stage's outputs made from other inputs.

        Fingerprints chain through the recipe, not through the files: without this check a
        ``--stage calibration`` on a stale float checkpoint would be recorded as current, and a
        later full run would retrain float but skip the calibration made from the old one.
        A stage never run is left to the reader's own "does not exist" message.
        """
        for name in names:
            state = StageState(self.workdir.stage(name), self.fps[name])
            data = read_json(state.file)
            if data and not state.done():
                why = "did not finish" if data.get("fingerprint") == state.fp \
                    else "was made from other inputs"
                raise UserError(f"{reader} reads stage {name!r}, whose output in "
                                f"{self.workdir.stage(name)} {why}: run `hat run {self.source} "
                                f"--stage {name}` first (or `hat run {self.source}` to redo "
                                "every stage whose inputs changed)")

    def run_stage(self, stage: Stage) -> None:
        state = StageState(self.workdir.stage(stage.name), self.fps[stage.name])
        if state.done():
            echo(f"{stage.name}: done, inputs unchanged, skipped")
            return
        if stage.needs:
            self.require_current([self.source_of(stage), *stage.needs[1:]], f"stage {stage.name!r}")
        if state.start():
            echo(f"{stage.name}: continuing an interrupted run")
        seed_everything(self.recipe.task.seed)  # a redone stage builds and draws the same
        self.ran.append(stage.name)
        try:
            state.finish(**(stage.run(self, stage) or {}))
        finally:
            gc.collect()
            runtime.release_memory()  # the stage's peak heap back to the kernel

    def score(self, row: str, ckpt: Path | None = None) -> dict[str, Any]:
        """Predict row ``row`` on the val set: writes ``predict/<row>/``, returns the metrics."""
        key = f"predict/{row}"
        out = self.workdir.predict(row)
        state = StageState(out, self.fps[key])
        if ckpt is None and state.done():
            echo(f"predict {row}: done, inputs unchanged, skipped")
            return read_json(self.workdir.predict_metrics(row)) or {}
        if ckpt is None:
            self.require_current([self.table.scored_by(row).name], f"predict row {row!r}")
        state.start()  # every process scores its share of the val set; rank 0 writes
        self.ran.append(key)
        model, runner = self.predictor(row, ckpt)
        device = self.predict_device(row)
        echo(f"predict {row}: scoring the val set")
        scores = self.evaluate(model.to(device), runner, out_dir=out, device=device,
                               desc=f"predict {row}")
        arithmetic = getattr(model, "hat_arithmetic", None)  # a quantizer's model says how it ran
        extra = {"checkpoint": str(ckpt)} if ckpt else {}
        if arithmetic:
            extra["arithmetic"] = arithmetic
        record = write_metrics(self.workdir.predict_metrics(row), row, scores, **extra) \
            if dist.is_main() else metrics_record(row, scores, **extra)
        flat = flat_scores(scores)
        echo(f"predict {row}: AP {flat.get('AP', float('nan')) * 100:.2f}  "
             f"AP50 {flat.get('AP50', float('nan')) * 100:.2f} (points)")
        if ckpt is None:
            state.finish(metrics=flat)
        return record


class StageState:
    """``<stage>/stage.json``: the fingerprint a stage ran with and whether it finished."""

    def __init__(self, stage_dir: Path, fp: str) -> None:
        self.dir, self.fp = stage_dir, fp
        self.file = stage_dir / STAGE_STATE

    def done(self) -> bool:
        data = read_json(self.file)
        return bool(data and data.get("fingerprint") == self.fp and data.get("status") == "done")

    def start(self) -> bool:
        """Mark running; wipe outputs made with other inputs. Returns True when resuming."""
        data = read_json(self.file)
        resuming = bool(data and data.get("fingerprint") == self.fp)
        if data and not resuming and self.dir.exists() and dist.is_main():
            shutil.rmtree(self.dir)
        dist.barrier()  # no process writes into the folder before rank 0 emptied it
        if dist.is_main():
            write_json(self.file, {"fingerprint": self.fp, "status": "running",
                                   "started": time.strftime("%Y-%m-%d %H:%M:%S")})
        return resuming

    def finish(self, **extra: Any) -> None:
        if dist.is_main():
            write_json(self.file, {"fingerprint": self.fp, "status": "done",
                                   "finished": time.strftime("%Y-%m-%d %H:%M:%S"), **extra})
