"""Checkpoints: ``state_dict``s only, written atomically, loaded with ``weights_only=True``.

A checkpoint file holds a dict: ``{"format": "hat-checkpoint", "version": 1, "model": state_dict,
...}`` plus, for ``checkpoint-last.pt``, what resume needs (optimizer, scheduler, EMA, epoch,
step, RNG states). It is written to a temporary file in the same folder and renamed, so a crash
never leaves half a checkpoint.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from hatcore.errors import UserError

FORMAT = "hat-checkpoint"
VERSION = 1


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` (tensors, numbers, strings, lists, dicts) atomically to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    :raises UserError: the file is missing, damaged or not a HAT checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise UserError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{path}: not a HAT checkpoint (no 'format': '{FORMAT}' field)")
    return data


def describe_checkpoint(path: Path) -> str:
    data = load_checkpoint(path)
    model = data.get("model", {})
    n_params = sum(t.numel() for t in model.values() if isinstance(t, torch.Tensor))
    keys = ", ".join(sorted(k for k in data if k not in ("format", "version")))
    lines = [
        f"{path}: HAT checkpoint, format version {data.get('version')}",
        f"  stage: {data.get('stage', '?')}  epoch: {data.get('epoch', '?')}  "
        f"step: {data.get('step', '?')}",
        f"  model: {len(model)} tensors, {n_params:,} values",
        f"  contents: {keys}",
    ]
    return "\n".join(lines)
