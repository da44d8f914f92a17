"""HAT trainer overhead: the same FCOS train steps through hatcore.trainer.Trainer and a bare loop.

    .venv/bin/python bench/trainer_overhead.py --size 512 --batch 8 --steps 4

Both train the seed's FCOS-EfficientNet-B0 (Lite0 weights) on one synthetic batch, channels-last,
SGD; the trainer adds what a real run has: LR schedule, EMA, progress bar, log.jsonl, checkpoint
at the end of the epoch. Rounds alternate so machine load hits both alike; best and median
img/s of each are printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from fcos_train_speed import bare_train_loop, build_model, synthetic_batch  # noqa: E402

from hatcore.recipe import Optimizer, Schedule, TrainStage  # noqa: E402
from hatcore.trainer import Trainer  # noqa: E402


class Timed(list):  # type: ignore[type-arg]
    """A 'loader' yielding one batch ``steps`` times and recording when each was taken."""

    def __init__(self, batch: dict, steps: int) -> None:  # type: ignore[type-arg]
        super().__init__([batch] * steps)
        self.stamps: list[float] = []

    def __iter__(self):  # type: ignore[no-untyped-def]
        for b in super().__iter__():
            self.stamps.append(time.perf_counter())
            yield b
        self.stamps.append(time.perf_counter())


def trainer_steps(batch: dict, steps: int, warmup: int) -> list[float]:  # type: ignore[type-arg]
    torch.manual_seed(0)
    loader = Timed(batch, warmup + steps)
    cfg = TrainStage(epochs=1, ema=True, channels_last=True, log_interval=1,
                     optimizer=Optimizer(lr=0.01, momentum=0.9),
                     schedule=Schedule(type="cosine", warmup_iters=2))
    with tempfile.TemporaryDirectory() as tmp:
        Trainer(stage="float", model=build_model(), cfg=cfg, train_loader=loader,  # type: ignore[arg-type]
                out_dir=Path(tmp), device=torch.device("cpu")).fit()
    s = loader.stamps
    return [b - a for a, b in zip(s[warmup:-1], s[warmup + 1:], strict=False)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    batch = synthetic_batch(args.batch, args.size)
    bare: list[float] = []
    hat: list[float] = []
    for _ in range(args.rounds):
        torch.manual_seed(0)
        bare += bare_train_loop(build_model(), batch, args.steps, warmup=1, channels_last=True)
        hat += trainer_steps(batch, args.steps, warmup=1)
    for name, times in (("bare loop", bare), ("HAT trainer", hat)):
        print(f"{name:12s} best {args.batch / min(times):6.2f} img/s   "
              f"median {args.batch / statistics.median(times):6.2f} img/s   ({len(times)} steps)")
    print(f"overhead (median step): {statistics.median(hat) / statistics.median(bare) - 1:+.1%}   "
          f"(best step): {min(hat) / min(bare) - 1:+.1%}")


if __name__ == "__main__":
    main()
