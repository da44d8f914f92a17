"""Deploy-road bench: integer simulator img/s vs the float eager forward, compile time, and
`perf` estimates of the FCOS-EfficientNet-B0 stand-in at 512x512 on every march.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bpu_deploy.py [--size 512] [--batch 2] [--reps 3]
        [--recipe recipes/fcos_efficientnetb0_mscoco.toml]   (the real model, random weights)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from hatcore.runtime import apply_process_settings

apply_process_settings()  # as the `hat` command does, before torch loads (malloc, OpenMP wait)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "plugins" / "hat-bpu" / "tests"))
from bpu_deploy_nets import FcosB0Like  # noqa: E402
from deploy_fixtures import calibrate, yuv_input  # noqa: E402
from hat_bpu import native  # noqa: E402
from hat_bpu.device import hbm, perf  # noqa: E402
from hat_bpu.device.march import MARCHES  # noqa: E402
from hat_bpu.ir import hbir  # noqa: E402
from hat_bpu.ir.reference import run_ir  # noqa: E402
from hat_bpu.ir.simulator import Simulator  # noqa: E402
from hat_bpu.quant.convert import convert  # noqa: E402


def best(fn, reps: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--recipe", type=Path, default=None,
                    help="build the recipe's model through the plugin hooks instead of the stand-in")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.recipe is not None:
        from hatcore.pipeline import Pipeline

        pipe = Pipeline.load(args.recipe, ["model.backbone.pretrained=''"])
        net = pipe.build_model().eval()
    else:
        net = FcosB0Like().eval()
    x = yuv_input(args.batch, args.size)
    q = calibrate(net, x)
    graph = convert(q, x[:1], march="bayes-e")
    sim = Simulator(graph)
    with torch.no_grad():
        net(x)
        sim.run(x)
        t_float = best(lambda: net(x), args.reps)
        net_cl = net.to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        net_cl(x_cl)
        t_float_cl, t_sim, t_torch, t_one = (float("inf"),) * 4
        for _ in range(args.reps):  # interleaved: float, the built passes (on torch's threads,
            # on one), the torch passes
            t_float_cl = min(t_float_cl, best(lambda: net_cl(x_cl), 1))
            t_sim = min(t_sim, best(lambda: sim.run(x), 1))
            with native.threads(1):
                t_one = min(t_one, best(lambda: sim.run(x), 1))
            with native.disabled():
                t_torch = min(t_torch, best(lambda: sim.run(x), 1))
        with native.disabled():
            torch_out = sim.run(x)
    same = all(torch.equal(torch.from_numpy(r), s)
               for r, s in zip(run_ir(graph, x[:1].numpy()), sim.run(x[:1]), strict=True))
    same_torch = all(torch.equal(a, b) for a, b in zip(torch_out, sim.run(x), strict=True))
    n = args.batch
    print(f"threads {torch.get_num_threads()}, input {n}x3x{args.size}x{args.size}, "
          f"built epilogue: {native.available()}")
    print(f"float eager (BN unfused): {n / t_float:.2f} img/s NCHW, "
          f"{n / t_float_cl:.2f} img/s channels-last")
    print(f"integer simulator:        {n / t_sim:.2f} img/s  "
          f"({t_float / t_sim:.2f}x float NCHW, {t_float_cl / t_sim:.2f}x channels-last), "
          f"bit-exact vs ir_reference: {same}")
    print(f"  built passes, 1 thread: {n / t_one:.2f} img/s  "
          f"({t_float_cl / t_one:.2f}x channels-last)")
    print(f"  torch-pass epilogue:    {n / t_torch:.2f} img/s  "
          f"({t_float_cl / t_torch:.2f}x channels-last), same outputs: {same_torch}")
    with tempfile.TemporaryDirectory() as d:
        art = Path(d) / "model.hbir"
        hbir.save_hbir(graph, art)
        for m in MARCHES:
            t = time.perf_counter()
            est = hbm.compile_file(art, m, Path(d) / m)
            dt = time.perf_counter() - t
            print(f"compile {m}: {dt:.2f} s, .hbm {(Path(d) / m / 'model.hbm').stat().st_size} B")
            print("  " + perf.table(est, top=1).splitlines()[-2])


if __name__ == "__main__":
    main()
