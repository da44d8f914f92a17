"""Every path a run writes under ``task.work_dir``, stated once.

::

    recipe.toml, recipe.resolved.json       what was asked, and every default filled in
    <stage>/                                one folder per stage of the table (hatcore.stages)
        stage.json                          fingerprint and status (skip / resume / redo)
        checkpoint-last.pt, checkpoint-best.pt, metrics.json, log.jsonl   (trained stages)
        <artifact>                          what a deploy stage writes; its file name comes from
                                            the plugin's spec (``ExportSpec.artifact``)
    predict/<row>/metrics.json              one schema for every metrics.json: see docs/formats.md
    predict/<row>/detections.json
    summary.json, summary.md, vis/, report.html

Code that needs a path asks a :class:`WorkDir`; nothing else joins file names onto the work dir.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHECKPOINT_LAST = "checkpoint-last.pt"
CHECKPOINT_BEST = "checkpoint-best.pt"
METRICS = "metrics.json"
LOG = "log.jsonl"
STAGE_STATE = "stage.json"
DETECTIONS = "detections.json"
METRICS_SCHEMA = 1


@dataclass(frozen=True)
class WorkDir:
    """The artifact paths of one run (``root`` is ``task.work_dir``)."""

    root: Path

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.toml"

    @property
    def resolved(self) -> Path:
        return self.root / "recipe.resolved.json"

    def stage(self, name: str) -> Path:
        """The folder of stage ``name`` (float, calibration, qat, export, compile, plugin stages)."""
        return self.root / name

    def checkpoint(self, stage: str, which: str = "best") -> Path:
        """``<stage>/checkpoint-{best,last}.pt``."""
        return self.stage(stage) / (CHECKPOINT_BEST if which == "best" else CHECKPOINT_LAST)

    def metrics(self, stage: str) -> Path:
        return self.stage(stage) / METRICS

    def log(self, stage: str) -> Path:
        return self.stage(stage) / LOG

    def state(self, stage: str) -> Path:
        return self.stage(stage) / STAGE_STATE

    def predict(self, row: str) -> Path:
        """The folder of predict row ``row``: ``predict/<row>/``."""
        return self.root / "predict" / row

    def predict_metrics(self, row: str) -> Path:
        return self.predict(row) / METRICS

    @property
    def summary_json(self) -> Path:
        return self.root / "summary.json"

    @property
    def summary_md(self) -> Path:
        return self.root / "summary.md"

    @property
    def vis(self) -> Path:
        return self.root / "vis"

    @property
    def curves(self) -> Path:
        return self.vis / "curves.png"

    def drawing(self, row: str, index: int) -> Path:
        return self.vis / f"{row}_{index}.png"


def read_json(path: Path) -> Any:
    """The JSON in ``path``, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def metrics_record(stage: str, scores: dict[str, Any] | None = None,
                   **extra: Any) -> dict[str, Any]:
    """The one ``metrics.json`` schema (docs/formats.md).

    :param stage: the stage or predict row the file belongs to.
    :param scores: the metric's result, one table of numbers per family (``{"bbox": {"AP": ..}}``).
    :param extra: further top-level keys (``train`` for a trained stage, ``calibration`` ...).
    """
    return {"schema": METRICS_SCHEMA, "stage": stage, **(scores or {}), **extra}


def write_metrics(path: Path, stage: str, scores: dict[str, Any] | None = None,
                  **extra: Any) -> dict[str, Any]:
    record = metrics_record(stage, scores, **extra)
    write_json(path, record)
    return record


def flat_scores(record: Any) -> dict[str, float]:
    """The first table of numbers in a metrics record: ``{"bbox": {"AP": ..}}`` -> ``{"AP": ..}``."""
    if not isinstance(record, dict):
        return {}
    for value in record.values():
        if isinstance(value, dict) and value and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value.values()):
            return {k: float(v) for k, v in value.items()}
    return {}
