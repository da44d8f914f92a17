"""The contracts between the core and plugins, as types: task model, metric, trainer, runner.

``build_model`` returns an ``nn.Module`` that is also a :class:`TaskModel`; ``build_metric`` a
:class:`Metric`; ``on_epoch_end`` receives a :class:`Trainer`. The core checks a built object
once, where it enters (:func:`task_model`, :func:`metric`), and then relies on the type.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from hatcore.data import Detections
from hatcore.errors import UserError

Runner = Callable[[Any], Any]
"""``runner(batch) -> raw``: the raw outputs the model's ``postprocess`` decodes.

Batches are :class:`hatcore.data.Batch` dicts; the protocols take ``Mapping[str, Any]`` so a
plain dict from a collate function satisfies them too."""


@runtime_checkable
class TaskModel(Protocol):
    """What ``build_model`` returns besides being an ``nn.Module`` (see :mod:`hatcore.data`)."""

    def __call__(self, img: torch.Tensor) -> Any:
        """``raw = model(batch["img"])``: the deployable graph."""

    def compute_loss(self, raw: Any, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The losses the trainer sums and back-propagates."""

    def postprocess(self, raw: Any, batch: Mapping[str, Any]) -> list[Detections]:
        """Decoded detections, one per image, in original-image coordinates."""


def score_threshold(model: object) -> float | None:
    """The optional ``score_threshold`` attribute of a task model: the lowest class score
    (0..1) its ``postprocess`` keeps, so a deploy backend may drop lower ones on the device
    (a device-side filter follows it). None when the model does not say."""
    value = getattr(model, "score_threshold", None)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or not 0 <= float(value) < 1:
        raise UserError(f"the model's score_threshold must be a number in [0, 1), got {value!r}")
    return float(value)


@runtime_checkable
class Metric(Protocol):
    """What ``build_metric`` returns."""

    def reset(self) -> None:
        """Forget what was seen."""

    def update(self, detections: list[Detections], batch: Mapping[str, Any]) -> None:
        """Add one batch's detections."""

    def compute(self, out_dir: Path | None = None) -> dict[str, dict[str, float]]:
        """``{"bbox": {"AP": .., ...}}`` (0..1); writes ``detections.json`` into ``out_dir``."""


class Trainer(Protocol):
    """What ``on_epoch_end`` receives (:class:`hatcore.trainer.Trainer`)."""

    stage: str
    model: nn.Module
    out_dir: Path
    epoch: int
    should_stop: bool

    @property
    def cfg(self) -> Any:
        """The stage's recipe table (``TrainStage``: ``epochs`` ...)."""


def _missing(obj: object, proto: type) -> list[str]:
    names = [n for n in ("__call__", "compute_loss", "postprocess", "reset", "update", "compute")
             if hasattr(proto, n) and n in proto.__dict__]
    return [n for n in names if not callable(getattr(obj, n, None))]


def task_model(model: object, where: str = "model") -> TaskModel:
    """``model`` as a :class:`TaskModel`, or a UserError naming the missing methods."""
    if not isinstance(model, TaskModel):
        raise UserError(f"the {where} ({type(model).__name__}) is not a task model: it lacks "
                        f"{', '.join(_missing(model, TaskModel))} (see hatcore.protocols.TaskModel)")
    return model


def metric(obj: object) -> Metric:
    """``obj`` as a :class:`Metric`, or a UserError naming the missing methods."""
    if not isinstance(obj, Metric):
        raise UserError(f"the metric ({type(obj).__name__}) lacks "
                        f"{', '.join(_missing(obj, Metric))} (see hatcore.protocols.Metric)")
    return obj
