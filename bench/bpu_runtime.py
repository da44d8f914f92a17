"""The compiled program on its runtime vs the graph on the integer simulator: compile time,
program size (instructions, buffers, peak activation memory) and speed, per opt level, on the
recipe's FCOS-EfficientNet-B0 (random weights, calibrated on random YUV images).

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/bpu_runtime.py --size 192 --reps 5
    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/bpu_runtime.py --size 512 --reps 3

Speed: one image at a time (as the board runs), the runtime and the simulator timed in
alternation in one process (their ratio holds under load), best of ``--reps``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "plugins" / "hat-bpu" / "tests"))
from deploy_fixtures import calibrate, yuv_input  # noqa: E402
from hat_bpu.device import hbm  # noqa: E402
from hat_bpu.device.runtime import Runtime  # noqa: E402
from hat_bpu.ir import hbir  # noqa: E402
from hat_bpu.ir.simulator import Simulator  # noqa: E402
from hat_bpu.quant.convert import convert  # noqa: E402

RECIPE = Path(__file__).parents[1] / "recipes" / "fcos_efficientnetb0_mscoco.toml"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=192)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--march", default="bayes-e")
    ap.add_argument("--recipe", type=Path, default=RECIPE)
    args = ap.parse_args()
    from hatcore.pipeline import Pipeline

    torch.manual_seed(0)
    net = Pipeline.load(args.recipe, ["model.backbone.pretrained=''"]).build_model().eval()
    x = yuv_input(2, args.size)
    graph = convert(calibrate(net, x), x[:1], march=args.march)
    print(f"FCOS-B0 {args.size}x{args.size}, {args.march}: {len(graph.nodes)} IR nodes, "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    sim = Simulator(graph)
    img = x[:1]
    want = sim.run(img)
    with tempfile.TemporaryDirectory() as d:
        art = Path(d) / "model.hbir"
        hbir.save_hbir(graph, art)
        print("| opt | compile | .hbm | instructions (fused) | buffers | allocated | peak live "
              "| runtime | simulator | runtime / simulator | bit-exact |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        fused: dict[str, int] = {}
        for opt in (0, 1, 2):
            out = Path(d) / f"o{opt}"
            t0 = time.perf_counter()
            est = hbm.compile_file(art, args.march, out, opt)
            compile_s = time.perf_counter() - t0
            rt = Runtime(out / "model.hbm")
            exact = all(torch.equal(a, b) for a, b in zip(rt.run(img), want, strict=True))
            t_rt, t_sim = [], []
            for _ in range(args.reps):
                t = time.perf_counter()
                rt.run(img)
                t_rt.append(time.perf_counter() - t)
                t = time.perf_counter()
                sim.run(img)
                t_sim.append(time.perf_counter() - t)
            p = est["program"]
            if opt == 1:
                fused = p["fused"]
            mib = 2**20
            print(f"| {opt} | {compile_s:.2f} s | {(out / 'model.hbm').stat().st_size / 1e6:.2f} MB "
                  f"| {p['instructions']} ({p['fused_instructions']}) | {p['buffers']} "
                  f"| {p['buffer_bytes'] / mib:.2f} MiB | {p['peak_activation_bytes'] / mib:.2f} MiB "
                  f"| {min(t_rt) * 1e3:.0f} ms | {min(t_sim) * 1e3:.0f} ms "
                  f"| {min(t_rt) / min(t_sim):.2f}x | {exact} |")
        print("fused patterns (opt 1):", fused)


if __name__ == "__main__":
    main()
