"""Time a work dir's ``align_bpu`` predict row in-process (the runtime on the val set, decoding
and scoring included), with the thread count the runtime uses.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/align_bpu_speed.py runs/demo/recipe.toml \\
        --set 'task.work_dir="runs/demo"' [--threads 2]

The work dir must hold a compiled ``compile/model.hbm`` made with the same ``--set`` overrides.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--threads", type=int, default=1, help="the runtime's threads (0: torch's)")
    args = ap.parse_args()
    from hat_bpu.device import runtime

    from hatcore.pipeline import Pipeline
    from hatcore.runtime import apply_process_settings

    apply_process_settings()
    init = runtime.Runtime.__init__

    def with_threads(self, path, arith=None, threads=1):  # type: ignore[no-untyped-def]
        init(self, path, arith, args.threads or None)
    runtime.Runtime.__init__ = with_threads  # type: ignore[method-assign]
    pipe = Pipeline.load(args.recipe, args.sets)
    model, runner = pipe.predictor("align_bpu")
    device = pipe.predict_device("align_bpu")
    spent = [0.0]

    def timed(batch):  # type: ignore[no-untyped-def]
        a = time.perf_counter()
        out = runner(batch)
        spent[0] += time.perf_counter() - a
        return out
    a = time.perf_counter()
    scores = pipe.evaluate(model.to(device), timed, out_dir=None, device=device, desc="align_bpu")
    print(f"align_bpu: {time.perf_counter() - a:.1f} s (runtime {spent[0]:.1f} s), "
          f"threads {args.threads or torch.get_num_threads()}, AP {scores['bbox']['AP']:.6f}"
          if "bbox" in scores else scores)


if __name__ == "__main__":
    main()
