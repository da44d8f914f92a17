"""Built-in trainer callbacks, registered as an ordinary plugin (``on_iter_end``, ``on_epoch_end``).

* progress: a tqdm bar only when stderr is a terminal (:func:`progress`); in a log file, one
  line every ``log_interval`` iterations (``on_iter_end``) and one per epoch instead, so a log
  holds lines, not piled-up ``\\r`` frames;
* a one-line epoch summary (rank 0), AP in points like the summary table;
* TensorBoard scalars in ``<stage dir>/tb`` when the ``tensorboard`` package is installed
  (``pip install hatcore[tb]``): ``STAGE/iter/loss``, ``STAGE/iter/lr`` ... per iteration,
  ``STAGE/loss``, ``STAGE/AP`` ... per epoch.

EMA, LR schedules and checkpoints live in the trainer itself (``hatcore.optim``,
``hatcore.trainer``): they change what is trained, not what is reported.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from hatcore import distributed as dist
from hatcore import hookimpl

_writers: dict[str, Any] = {}

AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
"""Scores kept 0..1 in files (as pycocotools) and shown in points (× 100) to the user."""


def interactive() -> bool:
    """stderr is a terminal: progress bars redraw in place (else they would pile up in a file)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def progress(iterable: Iterable[Any] | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar on rank 0 when stderr is a terminal, a silent one otherwise."""
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, disable=not (dist.is_main() and interactive()), **kwargs)


def _fmt(key: str, value: Any) -> str:
    if key in AP_KEYS:
        return f"{key} {value * 100:.2f}"
    if key == "lr":
        return f"lr {value:.2e}"
    return f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"


def _scalar(key: str, value: float) -> float:
    return value * 100 if key in AP_KEYS else value


@hookimpl
def on_iter_end(trainer: Any, step: int, metrics: dict[str, float]) -> None:
    """TensorBoard scalars every iteration; without a terminal, a line every ``log_interval``."""
    writer = _tensorboard(str(trainer.out_dir / "tb"))
    if writer is not None:
        for k, v in metrics.items():
            writer.add_scalar(f"{trainer.stage}/iter/{k}", v, step)
    every = int(getattr(trainer.cfg, "log_interval", 0) or 0)
    if every and step % every == 0 and not interactive():
        per = max(1, int(getattr(trainer, "iters_per_epoch", 1)))
        i = (step - 1) % per + 1
        shown = "  ".join(_fmt(k, v) for k, v in metrics.items())
        print(f"{trainer.stage} {trainer.epoch + 1}/{trainer.cfg.epochs} iter {i}/{per}: "
              f"{shown}", file=sys.stderr, flush=True)


@hookimpl
def on_epoch_end(trainer: Any, epoch: int, metrics: dict[str, Any]) -> None:
    """Print the epoch's averages and validation result; write TensorBoard scalars."""
    if not dist.is_main():
        return
    shown = [_fmt(k, v) for k, v in metrics.items() if k != "epoch" and isinstance(v, (int, float))]
    tqdm.write(f"{trainer.stage} epoch {epoch + 1}/{trainer.cfg.epochs}: " + "  ".join(shown))
    writer = _tensorboard(str(trainer.out_dir / "tb"))
    if writer is not None:
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and k != "epoch":
                writer.add_scalar(f"{trainer.stage}/{k}", _scalar(k, v), epoch + 1)
        writer.flush()


def _tensorboard(logdir: str) -> Any:
    """The writer of ``logdir`` (None without tensorboard). A stage redone from scratch deletes
    its folder, events file included: a writer whose folder is gone is replaced."""
    writer = _writers.get(logdir)
    if writer is not None and not Path(logdir).is_dir():
        with contextlib.suppress(Exception):
            writer.close()
        del _writers[logdir]
    if logdir not in _writers:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard not installed: scalars stay in log.jsonl
            _writers[logdir] = None
        else:
            _writers[logdir] = SummaryWriter(logdir)
    return _writers[logdir]
