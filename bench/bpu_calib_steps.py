"""Calibration AP against calibration steps (issue 11, point 6), from one float checkpoint.

Reuses the recipe's trained float stage (``WORK_DIR/float/checkpoint-best.pt``; run
``hat run RECIPE --stage float`` first), then for each transforms setting and step count:
prepares the model as the calibration stage does, observes ``steps`` batches of
:func:`hatcore.stages.calibration_loader` and scores the fake-quant model on the val set::

    OMP_NUM_THREADS=2 .venv/bin/python bench/bpu_calib_steps.py recipes/demo.toml \\
        --steps 1 2 4 8 16 32 --transforms val train

Prints a markdown table (AP, AP50, calibration seconds) and the float AP beside it.
"""

from __future__ import annotations

import argparse
import time

from hatcore import quant
from hatcore.pipeline import Pipeline
from hatcore.stages import calibration_loader
from hatcore.trainer import calibrate
from hatcore.workdir import flat_scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--transforms", nargs="+", default=["val", "train"], choices=["val", "train"])
    ap.add_argument("--batch-size", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()

    base = Pipeline.load(args.recipe, args.overrides)
    float_ap = flat_scores(base.evaluate(base.load_stage_model("float").to(base.device)))
    print(f"float: AP {100 * float_ap['AP']:.2f}  AP50 {100 * float_ap['AP50']:.2f}", flush=True)
    rows = []
    for transforms in args.transforms:
        for steps in args.steps:
            sets = [*args.overrides, f"stages.calibration.steps={steps}",
                    f"stages.calibration.transforms={transforms}"]
            if args.batch_size:
                sets.append(f"stages.calibration.batch_size={args.batch_size}")
            pipe = Pipeline.load(args.recipe, sets)
            model = pipe.quantize(pipe.load_stage_model("float"), "calibration").to(pipe.device)
            loader = calibration_loader(pipe)
            t0 = time.perf_counter()
            quant.set_mode(model, "observe")
            calibrate(model, loader, batches=steps, device=pipe.device, seed=pipe.recipe.task.seed)
            quant.set_mode(model, "fake_quant")
            secs = time.perf_counter() - t0
            s = flat_scores(pipe.evaluate(model, device=pipe.device))
            rows.append((transforms, steps, loader.batch_size, s["AP"], s["AP50"], secs))
            print(f"{transforms} steps {steps} x {loader.batch_size}: AP {100 * s['AP']:.2f}  "
                  f"AP50 {100 * s['AP50']:.2f}  ({secs:.1f} s)", flush=True)
    print("\n| transforms | steps | batch | images | AP | AP50 | Δ AP vs float | calib s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for t, n, b, a, a50, secs in rows:
        print(f"| {t} | {n} | {b} | {n * b} | {100 * a:.2f} | {100 * a50:.2f} | "
              f"{100 * (a - float_ap['AP']):+.2f} | {secs:.1f} |")


if __name__ == "__main__":
    main()
