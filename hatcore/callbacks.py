"""Built-in trainer callbacks, registered as an ordinary plugin (``on_epoch_end``).

* a one-line epoch summary on the console (rank 0),
* TensorBoard scalars in ``<stage dir>/tb`` when the ``tensorboard`` package is installed.

EMA, LR schedules and checkpoints live in the trainer itself (``hatcore.optim``,
``hatcore.trainer``): they change what is trained, not what is reported.
"""

from __future__ import annotations

from typing import Any

from tqdm import tqdm

from hatcore import distributed as dist
from hatcore import hookimpl

_writers: dict[str, Any] = {}


def _fmt(key: str, value: Any) -> str:
    if key in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
        return f"{key} {value * 100:.2f}"
    if key == "lr":
        return f"lr {value:.2e}"
    return f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"


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
                writer.add_scalar(f"{trainer.stage}/{k}", v, epoch + 1)
        writer.flush()


def _tensorboard(logdir: str) -> Any:
    if logdir not in _writers:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard not installed: scalars stay in log.jsonl
            _writers[logdir] = None
        else:
            _writers[logdir] = SummaryWriter(logdir)
    return _writers[logdir]
