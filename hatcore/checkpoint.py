"""Checkpoints: ``state_dict``s only, written atomically, loaded with ``weights_only=True``.

A checkpoint file holds a dict: ``{"format": "hat-checkpoint", "version": 1, "model": state_dict,
...}`` plus, for ``checkpoint-last.pt``, what resume needs (optimizer, scheduler, EMA, epoch,
step, RNG states) and ``crc32``, a checksum of everything else in it (tensors' bytes, dtypes and
shapes, and every other value), checked on load: a file damaged or modified after it was written
is refused (a byte flipped inside a tensor would otherwise load silently). It is written to a
temporary file in the same folder and renamed, so a crash never leaves half a checkpoint, and a
failed write (disk full) leaves the previous file as it was.
"""

from __future__ import annotations

import errno
import os
import tempfile
import zlib
from pathlib import Path
from typing import Any

import torch

from hatcore.errors import UserError

FORMAT = "hat-checkpoint"
VERSION = 1


def _crc(value: Any, crc: int = 0) -> int:
    """crc32 over a payload: dict keys in sorted order, tensors by dtype, shape and bytes."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous().reshape(-1)
        crc = zlib.crc32(f"T{t.dtype}{tuple(value.shape)}".encode(), crc)
        return zlib.crc32(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"", crc)
    if isinstance(value, dict):
        crc = zlib.crc32(b"D%d" % len(value), crc)
        for k in sorted(value, key=repr):
            crc = _crc(value[k], zlib.crc32(repr(k).encode(), crc))
        return crc
    if isinstance(value, (list, tuple)):
        crc = zlib.crc32(b"L%d" % len(value), crc)
        for v in value:
            crc = _crc(v, crc)
        return crc
    return zlib.crc32(repr(value).encode(), crc)


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` (tensors, numbers, strings, lists, dicts) atomically to ``path``.

    :raises UserError: the write failed (disk full, no permission): the message names the file
        and says that the previous version of it, if any, is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"format": FORMAT, "version": VERSION, **payload}
    data["crc32"] = _crc(data)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        why = "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else (
            exc.strerror or str(exc))
        kept = f"the previous {path.name} is intact" if path.is_file() else "nothing was written"
        raise UserError(f"{path}: cannot write the checkpoint: {why}; {kept}. Free some space "
                        "and run the same command again to resume") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    :raises UserError: the file is missing, damaged, fails its checksum or is not a HAT
        checkpoint.
    """
    return _read(Path(path), map_location)[0]


def _read(path: Path, map_location: str | torch.device) -> tuple[dict[str, Any], bool]:
    """The checkpoint and whether a checksum was verified (files older than it have none)."""
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise UserError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{path}: not a HAT checkpoint (no 'format': '{FORMAT}' field)")
    if "crc32" not in data:
        return data, False
    stored = data.pop("crc32")
    if _crc(data) != stored:
        raise UserError(f"{path}: checkpoint fails its crc32 check (damaged or modified after it "
                        "was written)")
    return data, True


def load_model_state(model: torch.nn.Module, state: dict[str, Any], path: str | Path) -> None:
    """``model.load_state_dict(state)``; weights of another model are a UserError naming the
    missing, unexpected and differently shaped keys (a few of each) and the checkpoint."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and isinstance(state[k], torch.Tensor)
              and isinstance(own[k], torch.Tensor) and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

        parts = [f"{len(missing)} missing: {few(missing)}" if missing else "",
                 f"{len(unexpected)} unexpected: {few(unexpected)}" if unexpected else "",
                 f"{len(shapes)} of another shape (checkpoint vs model): {few(shapes)}"
                 if shapes else ""]
        raise UserError(f"{path}: the checkpoint holds another model's weights ("
                        + "; ".join(p for p in parts if p) + ")")
    model.load_state_dict(state)


def describe_checkpoint(path: Path) -> str:
    data, verified = _read(path, "cpu")
    model = data.get("model", {})
    n_params = sum(t.numel() for t in model.values() if isinstance(t, torch.Tensor))
    keys = ", ".join(sorted(k for k in data if k not in ("format", "version")))
    lines = [
        f"{path}: HAT checkpoint, format version {data.get('version')}, "
        + ("crc32 verified" if verified else "no checksum (written by an older HAT)"),
        f"  stage: {data.get('stage', '?')}  epoch: {data.get('epoch', '?')}  "
        f"step: {data.get('step', '?')}" + (
            f"  (mid-epoch: {data['mid_epoch']['iter']} iterations into the next epoch)"
            if isinstance(data.get("mid_epoch"), dict) else ""),
        f"  model: {len(model)} tensors, {n_params:,} values",
        f"  contents: {keys}",
    ]
    return "\n".join(lines)
