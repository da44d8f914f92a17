"""Device-side filtering on a finished run: align_bpu AP with and without the filter, and the
bytes of head outputs leaving the device per frame (dense int maps vs the survivors).

    python bench/device_filter.py RECIPE [--set KEY=VALUE ...] [--thr 0.05 ...]

Reads ``work_dir/compile/model.hbm`` of the run (the recipe and overrides that ran it) and
scores the val set through the board runner twice per threshold: as is (dense outputs) and with
:mod:`hat_bpu.device.filter` between the runtime and the decoder (what ``align_bpu`` runs).
"""

from __future__ import annotations

import argparse
import json
import time

from hat_bpu.device import filter as devfilter
from hat_bpu.device.runtime import board_runner
from hat_bpu.ir import hbir
from hat_bpu.plugin import filtered_runner

from hatcore.pipeline import Pipeline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("recipe")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--thr", type=float, action="append", default=None,
                    help="filter score thresholds to measure (default: 0.05)")
    args = ap.parse_args()
    pipe = Pipeline.load(args.recipe, args.overrides)
    path = pipe.artifact("compile")
    graph = hbir.load_hbir(pipe.artifact("export"))
    model = pipe.build_model().eval()
    rows = []
    t0 = time.perf_counter()
    dense = pipe.evaluate(model, board_runner(path), device=pipe.predict_device("align_bpu"))
    rows.append({"filter": "off", "AP": dense["bbox"]["AP"], "AP50": dense["bbox"]["AP50"],
                 "s": round(time.perf_counter() - t0, 1)})
    for thr in args.thr or [devfilter.DEFAULT_SCORE_THR]:
        filt = devfilter.plan(graph, thr)
        if filt is None:
            raise SystemExit("the model's outputs are not per-level groups: nothing to filter")
        runner = filtered_runner(path, board_runner(path), filt)
        t0 = time.perf_counter()
        res = pipe.evaluate(model, runner, device=pipe.predict_device("align_bpu"))
        st = runner.stats  # type: ignore[attr-defined]
        n = st["images"]
        rows.append({"filter": f"score > {thr} (logit {devfilter.logit(thr):.3f}, T = "
                     f"{filt['threshold']})", "AP": res["bbox"]["AP"],
                     "AP50": res["bbox"]["AP50"], "s": round(time.perf_counter() - t0, 1),
                     "survivors_per_frame": st["survivors"] / n,
                     "points_per_frame": st["points"] / n,
                     "dense_bytes_per_frame": st["dense_bytes"] / n,
                     "filtered_bytes_per_frame": st["filtered_bytes"] / n})
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
