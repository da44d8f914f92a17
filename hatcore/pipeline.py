"""The stage graph: float → calibration → qat → export → compile, and predict for each.

Every stage writes into ``task.work_dir/<stage>/`` and records ``stage.json`` with the
fingerprint of everything it read (its recipe sections and its upstream stage's fingerprint).
A stage whose ``stage.json`` says done with the same fingerprint is skipped; a stage whose inputs
changed is redone from scratch (and so is everything after it, since their fingerprints chain);
a stage that was interrupted resumes (the trainer picks up ``checkpoint-last.pt``).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import click
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from hatcore import distributed as dist
from hatcore import quant
from hatcore.checkpoint import load_checkpoint
from hatcore.data import to_device
from hatcore.errors import RecipeError, UserError
from hatcore.plugins import Plugins, get_plugins
from hatcore.recipe import (
    PREDICT_STAGES,
    CompileSpec,
    ExportSpec,
    MetricSpec,
    QuantizeSpec,
    Recipe,
    explain,
    load_recipe,
    make_converter,
    resolved,
)
from hatcore.trainer import configure_determinism

TRAIN_STAGES = ("float", "calibration", "qat")
DEPLOY_STAGES = ("export", "compile")
ALL_STAGES = (*TRAIN_STAGES, *DEPLOY_STAGES, "predict")


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
    """One recipe's run: builds its parts through the plugins and runs its stages."""

    def __init__(self, recipe: Recipe, raw: dict[str, Any], source: Path, plugins: Plugins,
                 overrides: tuple[str, ...] = ()) -> None:
        self.recipe, self.raw, self.source, self.plugins = recipe, raw, source, plugins
        self.overrides = overrides
        self.hook = plugins.hook
        self.work_dir = Path(recipe.task.work_dir)
        self.device = self._device(recipe.task.device)
        configure_determinism(recipe.task.deterministic)
        self._datasets: dict[str, Dataset[Any]] = {}
        self.resolved = resolved(recipe, plugins.registry)

    @classmethod
    def load(cls, path: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> Pipeline:
        plugins = get_plugins()
        recipe, raw = load_recipe(path, plugins.registry, tuple(overrides))
        return cls(recipe, raw, Path(path), plugins, tuple(overrides))

    @staticmethod
    def _device(name: str) -> torch.device:
        if name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"task.device = {name!r}, but CUDA is not available on this machine")
        return torch.device(name)

    # ------------------------------------------------------------------ building parts

    def need(self, result: Any, what: str, type_name: str) -> Any:
        if result is None:
            raise UserError(f"no installed plugin builds {what} type {type_name!r} "
                            f"(`hat plugins` lists what is installed)")
        return result

    def build_model(self) -> nn.Module:
        spec = self.recipe.model
        return self.need(self.hook.build_model(spec=spec), "model", spec.type)

    def build_transforms(self, split: str) -> list[Callable[[dict[str, Any]], dict[str, Any]]]:
        spec = self._data_spec(split)
        return [self.need(self.hook.build_transform(spec=t), "transform", t.type)
                for t in spec.transforms]

    def _data_spec(self, split: str) -> Any:
        spec = getattr(self.recipe.data, split)
        if spec is None:
            raise UserError(f"{self.source}: the recipe has no [data.{split}] table")
        return spec

    def build_dataset(self, split: str) -> Dataset[Any]:
        if split not in self._datasets:
            spec = self._data_spec(split)
            ds = self.hook.build_dataset(spec=spec, split=split,
                                         transforms=self.build_transforms(split))
            self._datasets[split] = self.need(ds, "dataset", spec.type)
        return self._datasets[split]

    def loader(self, split: str, *, distributed: bool = False) -> DataLoader[Any]:
        spec = self._data_spec(split)
        ds = self.build_dataset(split)
        shuffle = spec.shuffle if spec.shuffle is not None else split == "train"
        sampler = dist.train_sampler(ds, shuffle=shuffle, seed=self.recipe.task.seed) \
            if distributed else None
        gen = torch.Generator().manual_seed(self.recipe.task.seed)
        return DataLoader(
            ds, batch_size=spec.batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
            num_workers=spec.num_workers, collate_fn=getattr(ds, "collate_fn", None),
            worker_init_fn=_seed_worker, generator=gen, drop_last=split == "train",
            pin_memory=self.device.type == "cuda",
        )

    def build_metric(self) -> Any:
        spec = self.section("metric")
        return self.need(self.hook.build_metric(spec=spec, dataset=self.build_dataset("val")),
                          "metric", spec.type)

    def section(self, name: str) -> Any:
        """The recipe's ``[metric]``/``[quantize]``/``[export]``/``[compile]``, or its defaults."""
        value = getattr(self.recipe, name)
        if value is None:
            try:
                value = make_converter(self.plugins.registry).structure({}, SECTION_TYPES[name])
            except Exception as exc:
                raise RecipeError(str(self.source), explain(exc, f"$.{name}")) from None
        return value

    def example_input(self) -> torch.Tensor:
        return torch.zeros(self.section("export").input_shape)

    def quantized_model(self, stage: str) -> nn.Module:
        """A freshly built model prepared by the quantizer for ``stage`` (weights not loaded)."""
        spec = self.section("quantize")
        model = self.build_model().eval()
        return self.need(self.hook.quantize(model=model, spec=spec, stage=stage),
                          "quantizer", spec.type)

    def stage_checkpoint(self, stage: str, which: str = "best") -> Path:
        path = self.work_dir / stage / f"checkpoint-{which}.pt"
        if not path.is_file():
            raise UserError(f"{path} does not exist: run `hat run {self.source} --stage {stage}` first")
        return path

    def load_stage_model(self, stage: str, ckpt: Path | None = None) -> nn.Module:
        """The model of a trained stage (float, calibration, qat), best weights, eval mode."""
        model = self.build_model() if stage == "float" else self.quantized_model(stage)
        state = load_checkpoint(ckpt or self.stage_checkpoint(stage))
        model.load_state_dict(state["model"])
        if stage != "float":
            quant.set_mode(model, "fake_quant")
        return model.eval()

    def predictor(self, stage: str, ckpt: Path | None = None) -> tuple[nn.Module, Callable[[Any], Any]]:
        """``(model, runner)``: ``runner(batch) -> raw``; ``model.postprocess(raw, batch)`` decodes."""
        if stage in TRAIN_STAGES:
            model = self.load_stage_model(stage, ckpt).to(self.device)
            return model, lambda batch: model(batch["img"])
        artifact = {"int_infer": self.work_dir / "export" / "model.hbir",
                    "align_bpu": self.work_dir / "compile" / "model.hbm"}.get(stage)
        if artifact is None:
            raise UserError(f"unknown predict stage {stage!r}; valid: {', '.join(PREDICT_STAGES)}")
        if not artifact.is_file():
            before = "export" if stage == "int_infer" else "compile"
            raise UserError(f"{artifact} does not exist: run `hat run {self.source} --stage {before}` first")
        runner = self.hook.load_deployed(path=artifact, stage=stage)
        if runner is None:
            raise UserError(f"no installed plugin runs {artifact.name} (pip install hat-bpu)")
        return self.build_model().eval(), runner

    @torch.no_grad()
    def evaluate(self, model: nn.Module, runner: Callable[[Any], Any] | None = None,
                 out_dir: Path | None = None, device: torch.device | None = None,
                 desc: str = "eval") -> dict[str, Any]:
        """Run ``runner`` (default: the model) over the val set and score it with the metric."""
        from tqdm import tqdm

        device = device or next(model.parameters(), torch.empty(0)).device
        run = runner or (lambda batch: model(batch["img"]))
        metric = self.build_metric()
        metric.reset()
        was_training = model.training
        model.eval()
        loader = self.loader("val")
        for batch in tqdm(loader, desc=desc, leave=False, disable=not dist.is_main(),
                          dynamic_ncols=True):
            batch = to_device(batch, device)
            dets = cast(Any, model).postprocess(run(batch), batch)
            metric.update(dets, batch)
        model.train(was_training)
        return metric.compute(out_dir)


SECTION_TYPES: dict[str, type] = {
    "metric": MetricSpec, "quantize": QuantizeSpec, "export": ExportSpec, "compile": CompileSpec,
}


def flat_metrics(result: dict[str, Any]) -> dict[str, float]:
    """``{"bbox": {"AP": ..}}`` -> ``{"AP": ..}`` (the first table of numbers)."""
    for value in result.values():
        if isinstance(value, dict) and all(isinstance(v, (int, float)) for v in value.values()):
            return {k: float(v) for k, v in value.items()}
    return {k: float(v) for k, v in result.items() if isinstance(v, (int, float))}


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


class StageState:
    """``<stage>/stage.json``: the fingerprint a stage ran with and whether it finished."""

    def __init__(self, stage_dir: Path, fp: str) -> None:
        self.dir, self.fp = stage_dir, fp
        self.file = stage_dir / "stage.json"

    def done(self) -> bool:
        data = read_json(self.file)
        return bool(data and data.get("fingerprint") == self.fp and data.get("status") == "done")

    def start(self) -> bool:
        """Mark running; wipe outputs made with other inputs. Returns True when resuming."""
        data = read_json(self.file)
        resuming = bool(data and data.get("fingerprint") == self.fp)
        if data and not resuming and self.dir.exists():
            shutil.rmtree(self.dir)
        if dist.is_main():
            write_json(self.file, {"fingerprint": self.fp, "status": "running",
                                   "started": time.strftime("%Y-%m-%d %H:%M:%S")})
        return resuming

    def finish(self, **extra: Any) -> None:
        if dist.is_main():
            write_json(self.file, {"fingerprint": self.fp, "status": "done",
                                   "finished": time.strftime("%Y-%m-%d %H:%M:%S"), **extra})
