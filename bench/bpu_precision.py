"""Validation of the int8/int16 search (issue 16, point 3) on one recipe's trained float model.

Measures the SQNR sensitivity of the recipe's calibration model (``hat quant-debug
--sensitivity``, cached), runs the search at two budgets between the all-int8 and all-int16
latencies, then for all-int8, all-int16, the recipe's default (head int16) and the two tuned
choices: prepares the float model with those overrides, calibrates (the recipe's calibration
stage settings), scores AP on the val set and estimates the latency of the converted graph::

    OMP_NUM_THREADS=1 .venv/bin/python bench/bpu_precision.py bench/bpu_demo_small.toml \\
        --batches 1 --fractions 0.25 0.5

Needs ``hat run RECIPE --stage float --stage calibration`` first. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import time

from hat_bpu.device.march import get_march
from hat_bpu.device.perf import estimate
from hat_bpu.quant.convert import convert
from hat_bpu.quant.precision import latency_ms, overrides_for, tune
from hat_bpu.quant.sensitivity import recipe_sensitivity

from hatcore import quant
from hatcore.pipeline import Pipeline
from hatcore.stages import calibration_loader
from hatcore.trainer import calibrate
from hatcore.workdir import flat_scores


def _toml_table(over: dict[str, str]) -> str:
    return "{" + ", ".join(f'"{k}" = "{v}"' for k, v in over.items()) + "}"


def measure(recipe: str, sets: list[str], over: dict[str, str] | None) -> tuple[float, float]:
    """(AP after calibration, estimated latency ms) of the recipe with ``overrides = over``."""
    extra = [] if over is None else [f"quantize.overrides={_toml_table(over)}"]
    pipe = Pipeline.load(recipe, [*sets, *extra])
    model = pipe.quantize(pipe.load_stage_model("float"), "calibration").to(pipe.device)
    cfg = pipe.recipe.stages.calibration
    quant.set_mode(model, "observe")
    calibrate(model, calibration_loader(pipe), batches=cfg.num_steps, device=pipe.device,
              seed=pipe.recipe.task.seed)
    quant.set_mode(model, "fake_quant")
    ap = flat_scores(pipe.evaluate(model, device=pipe.device))["AP"]
    graph = convert(model.cpu().eval(), pipe.example_input(), march=pipe.recipe.target.march)
    return ap, float(estimate(graph, get_march(pipe.recipe.target.march))["latency_ms"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("--batches", type=int, default=1, help="val batches of the SQNR sensitivity")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5],
                    help="budgets: all-int8 latency + fraction x (all-int16 - all-int8)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()

    pipe = Pipeline.load(args.recipe, args.overrides)
    t0 = time.perf_counter()
    model, record, _ = recipe_sensitivity(pipe, "calibration", "sqnr", args.batches, None)
    print(f"sensitivity: {len(record['units'])} units in {time.perf_counter() - t0:.0f} s",
          flush=True)
    march = get_march(pipe.recipe.target.march)
    graph = convert(model, pipe.example_input(), march=pipe.recipe.target.march)
    gains = [r["unit"] for r in record["units"] if r["int16_gain"] is not None]
    lo, hi = latency_ms(graph, march, set()), latency_ms(graph, march, set(gains))
    configs: list[tuple[str, dict[str, str] | None, str]] = [
        ("all int8", {"*": "int8"}, ""), ("all int16", {"*": "int16"}, ""),
        ("recipe default (head int16)", None, "")]
    for f in args.fractions:
        budget = lo + f * (hi - lo)
        res = tune(record, graph, march, budget)
        over = overrides_for(res["int16"], dict(pipe.recipe.quantize.overrides))
        configs.append((f"tuned, budget {budget:.4f} ms", over,
                        f"{len(res['int16'])} int16 units, predicted {res['latency_ms']:.4f} ms, "
                        f"+{res['predicted_gain']:.1f} dB SQNR"))
        print(configs[-1][0], configs[-1][2], res["int16"][:10], flush=True)
    rows = []
    for name, over, note in configs:
        a, lat = measure(args.recipe, args.overrides, over)
        rows.append((name, a, lat, note))
        print(f"{name}: AP {100 * a:.2f}  latency {lat:.4f} ms", flush=True)
    (a8, l8), (a16, l16) = rows[0][1:3], rows[1][1:3]
    print("\n| configuration | AP after calibration | est. latency (ms) | line int8→int16 at "
          "that latency | note |")
    print("|---|---:|---:|---:|---|")
    for name, a, lat, note in rows:
        line = a8 + (a16 - a8) * (lat - l8) / (l16 - l8) if l16 != l8 else a8
        print(f"| {name} | {100 * a:.2f} | {lat:.4f} | {100 * line:.2f} | {note} |")


if __name__ == "__main__":
    main()
