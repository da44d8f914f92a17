"""Validation of the int8/int16 search (issue 16, point 3) on one recipe's trained float model.

Measures the SQNR sensitivity of the recipe's calibration model (``hat quant-debug
--sensitivity``, cached), runs the search at two budgets between the all-int8 and all-int16
latencies, then for all-int8, all-int16, the recipe's default (head int16) and the two tuned
choices: prepares the float model with those overrides, calibrates (the recipe's calibration
stage settings), scores AP on the val set, estimates the latency of the converted graph, and
with ``--qat`` fine-tunes the calibrated model with the recipe's ``[stages.qat]`` (shorten it
with ``--set stages.qat.epochs=1``) and scores it again::

    OMP_NUM_THREADS=1 .venv/bin/python bench/bpu_precision.py recipes/dense.toml \\
        --batches 1 --fractions 0.25 0.5 --qat

Needs ``hat run RECIPE --stage float`` first (and the calibration stage for the sensitivity).
``--sens-set KEY=VALUE`` (repeatable) adds settings for the sensitivity pass only, on top of
``--set``: e.g. ``--sens-set data.val.batch_size=1 --batches 1`` measures the SQNR on one
validation image, for a large model where the val batch is slow or heavy (the rows are still
measured with ``--set`` alone).
Prints a markdown table; the "line" columns interpolate AP linearly between all-int8 and
all-int16 at the row's latency (a naive choice of that latency), "vs line" is the row minus it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from hat_bpu.device.march import get_march
from hat_bpu.device.perf import estimate
from hat_bpu.quant.convert import convert
from hat_bpu.quant.precision import latency_ms, overrides_for, tune
from hat_bpu.quant.sensitivity import recipe_sensitivity

from hatcore import quant
from hatcore.pipeline import Pipeline
from hatcore.stages import calibration_loader
from hatcore.trainer import Trainer, calibrate
from hatcore.workdir import flat_scores


def _toml_table(over: dict[str, str]) -> str:
    return "{" + ", ".join(f'"{k}" = "{v}"' for k, v in over.items()) + "}"


def measure(recipe: str, sets: list[str], over: dict[str, str] | None, qat: bool
            ) -> dict[str, Any]:
    """AP after calibration (``cal``), estimated latency (``ms``) and, with ``qat``, AP after
    the recipe's QAT stage from that calibration (``qat``) of the recipe with ``overrides =
    over`` (None: the recipe's own)."""
    extra = [] if over is None else [f"quantize.overrides={_toml_table(over)}"]
    pipe = Pipeline.load(recipe, [*sets, *extra])
    model = pipe.quantize(pipe.load_stage_model("float"), "calibration").to(pipe.device)
    cfg = pipe.recipe.stages.calibration
    quant.set_mode(model, "observe")
    calibrate(model, calibration_loader(pipe), batches=cfg.num_steps, device=pipe.device,
              seed=pipe.recipe.task.seed)
    quant.set_mode(model, "fake_quant")
    out: dict[str, Any] = {"cal": flat_scores(pipe.evaluate(model, device=pipe.device))["AP"]}
    graph = convert(model.cpu().eval(), pipe.example_input(), march=pipe.recipe.target.march)
    out["ms"] = float(estimate(graph, get_march(pipe.recipe.target.march))["latency_ms"])
    if qat:  # as the qat stage does: a fresh qat model with the calibrated state
        qm = pipe.quantize(pipe.load_stage_model("float"), "qat")
        qm.load_state_dict(model.state_dict())
        quant.set_mode(qm, "qat")
        with tempfile.TemporaryDirectory() as tmp:
            Trainer(stage="qat", model=qm, cfg=pipe.recipe.stages.qat,
                    train_loader=pipe.loader("train"), out_dir=Path(tmp), device=pipe.device,
                    hook=pipe.hook, seed=pipe.recipe.task.seed).fit()
        quant.set_mode(qm, "fake_quant")
        out["qat"] = flat_scores(pipe.evaluate(qm.eval(), device=pipe.device))["AP"]
    return out


def tuned_configs(pipe: Pipeline, args: argparse.Namespace
                  ) -> list[tuple[str, dict[str, str] | None, str]]:
    """The search's choice at each budget fraction, from the (cached) SQNR sensitivity."""
    t0 = time.perf_counter()
    if args.sens_set:  # the sensitivity pass's own settings (same work_dir, same checkpoints)
        pipe = Pipeline.load(args.recipe, [*args.overrides, *args.sens_set])
    model, record, _ = recipe_sensitivity(pipe, "calibration", "sqnr", args.batches, None,
                                          args.float_reverse, echo=lambda m: print(m, flush=True))
    print(f"sensitivity: {len(record['units'])} units in {time.perf_counter() - t0:.0f} s",
          flush=True)
    march = get_march(pipe.recipe.target.march)
    graph = convert(model, pipe.example_input(), march=pipe.recipe.target.march)
    gains = [r["unit"] for r in record["units"] if r["int16_gain"] is not None]
    lo, hi = latency_ms(graph, march, set()), latency_ms(graph, march, set(gains))
    out = []
    for f in args.fractions:
        budget = lo + f * (hi - lo)
        res = tune(record, graph, march, budget)
        over = overrides_for(res["int16"], dict(pipe.recipe.quantize.overrides))
        out.append((f"tuned, budget {budget:.4f} ms", over,
                    f"{len(res['int16'])} int16 units, predicted {res['latency_ms']:.4f} ms, "
                    f"+{res['predicted_gain']:.1f} dB SQNR"))
        print(out[-1][0], out[-1][2], res["int16"][:10], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("--batches", type=int, default=1, help="val batches of the SQNR sensitivity")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5],
                    help="budgets: all-int8 latency + fraction x (all-int16 - all-int8)")
    ap.add_argument("--qat", action="store_true", help="also AP after the recipe's QAT stage")
    ap.add_argument("--float-reverse", action="store_true",
                    help="the sensitivity also measures the float reverse (cached for quant-debug)")
    ap.add_argument("--results", type=Path, default=None,
                    help="JSON of measured rows: a row measured before (same recipe, --set, "
                    "overrides, --qat) is read, not rerun")
    ap.add_argument("--only", nargs="+", default=None,
                    help="measure only the configurations whose name contains one of these "
                    "(no table)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--sens-set", dest="sens_set", action="append", default=[],
                    metavar="KEY=VALUE", help="a setting for the sensitivity pass only (after "
                    "--set), e.g. data.val.batch_size=1")
    args = ap.parse_args()

    pipe = Pipeline.load(args.recipe, args.overrides)
    done = json.loads(args.results.read_text()) if args.results and args.results.is_file() else {}
    fkey = json.dumps([args.recipe, args.overrides, "float"])
    if fkey not in done:
        done[fkey] = flat_scores(pipe.evaluate(pipe.load_stage_model("float"),
                                               device=pipe.device))["AP"]
    print(f"float AP {100 * done[fkey]:.2f}", flush=True)
    configs: list[tuple[str, dict[str, str] | None, str]] = [
        ("all int8", {"*": "int8"}, ""), ("all int16", {"*": "int16"}, ""),
        ("recipe default (head int16)", None, "")]
    if not args.only or any("tuned" in o for o in args.only):
        configs += tuned_configs(pipe, args)
    rows = []
    for name, over, note in configs:
        if args.only and not any(o in name for o in args.only):
            continue
        t = time.perf_counter()
        key = json.dumps([args.recipe, args.overrides, over, args.qat])
        m = done.get(key) or measure(args.recipe, args.overrides, over, args.qat)
        if args.results:
            done[key] = m
            args.results.write_text(json.dumps(done, indent=1))
        rows.append((name, m, note))
        print(f"{name}: " + "  ".join(f"{k} {v:.4f}" for k, v in m.items())
              + f"  ({time.perf_counter() - t:.0f} s)", flush=True)
    if args.only:
        return
    m8, m16 = rows[0][1], rows[1][1]

    def line(m: dict[str, Any], k: str) -> float:
        if m16["ms"] == m8["ms"]:
            return m8[k]
        return m8[k] + (m16[k] - m8[k]) * (m["ms"] - m8["ms"]) / (m16["ms"] - m8["ms"])

    keys = ["cal", *(["qat"] if args.qat else [])]
    names = {"cal": "calibration", "qat": "QAT"}
    print("\n| configuration | est. latency (ms) | "
          + " | ".join(f"AP {names[k]} | line | vs line" for k in keys) + " | note |")
    print("|---|---:|" + "---:|---:|---:|" * len(keys) + "---|")
    for name, m, note in rows:
        cells = " | ".join(f"{100 * m[k]:.2f} | {100 * line(m, k):.2f} | "
                           f"{100 * (m[k] - line(m, k)):+.2f}" for k in keys)
        print(f"| {name} | {m['ms']:.4f} | {cells} | {note} |")


if __name__ == "__main__":
    main()
