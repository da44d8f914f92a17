"""ONNX Runtime bench: img/s of the integer model in ORT (exact and QDQ forms) vs hat-bpu's
simulator, and of the float model in ORT vs torch eager, on FCOS-EfficientNet-B0 (the real
recipe's model, random weights, calibrated on random YUV input); plus the agreement of each
ORT run with its reference on that input.

    OMP_NUM_THREADS=1 .venv/bin/python bench/onnx_speed.py [--size 512] [--batch 1] [--reps 3]
        [--recipe recipes/fcos_efficientnetb0_mscoco.toml] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "plugins" / "hat-bpu" / "tests"))
from deploy_fixtures import calibrate, yuv_input  # noqa: E402
from hat_bpu.ir.hbir import save_hbir  # noqa: E402
from hat_bpu.ir.simulator import Simulator  # noqa: E402
from hat_bpu.quant.convert import convert  # noqa: E402
from hat_onnx import hbir, lower  # noqa: E402
from hat_onnx.runtime import export_float, session  # noqa: E402


def best(fn, reps: int) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def lsb(a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    return np.rint(np.abs(a.astype(np.float64) - b.astype(np.float64)) / scale)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="ORT intra-op threads")
    ap.add_argument("--recipe", type=Path, default=Path("recipes/fcos_efficientnetb0_mscoco.toml"))
    args = ap.parse_args()
    torch.manual_seed(0)
    from hatcore.pipeline import Pipeline

    pipe = Pipeline.load(args.recipe, ["model.backbone.pretrained=''"])
    net = pipe.build_model().eval()
    x = yuv_input(args.batch, args.size)
    q = calibrate(net, yuv_input(2, args.size, seed=1))
    graph = convert(q, x[:1], march="bayes-e")
    tmp = Path(tempfile.mkdtemp())
    save_hbir(graph, tmp / "m.hbir")
    g = hbir.read_hbir(tmp / "m.hbir")
    sess = {}
    for form in ("int", "qdq"):
        m = lower.to_onnx(g, form)
        lower.check(m, g)
        sess[form] = session(m.SerializeToString(), args.threads)
    export_float(net, x[:1], tmp / "f.onnx")
    sess["float"] = session(tmp / "f.onnx", args.threads)
    sim = Simulator(graph)
    xn = x.numpy()

    def ort(form: str):  # type: ignore[no-untyped-def]
        s = sess[form]
        return s.run(None, {s.get_inputs()[0].name: xn})

    with torch.no_grad():
        t_eager = best(lambda: net(x), args.reps)
    t = {"float eager (torch)": t_eager, "float ORT": best(lambda: ort("float"), args.reps),
         "int simulator (int_infer)": best(lambda: sim.run(x), args.reps),
         "int ORT exact (model.int.onnx)": best(lambda: ort("int"), args.reps),
         "int ORT QDQ (model.qdq.onnx)": best(lambda: ort("qdq"), args.reps)}
    print(f"FCOS-B0 {args.size}x{args.size}, batch {args.batch}, torch threads "
          f"{torch.get_num_threads()}, ORT threads {args.threads}, best of {args.reps}")
    for k, v in t.items():
        print(f"  {k:32s} {args.batch / v:8.2f} img/s   ({v * 1000:.0f} ms/batch, "
              f"{t['int simulator (int_infer)'] / v:.2f}x the simulator)")

    ref = [r.numpy() for r in sim.run(x)]
    scales = [graph.tensors[graph.producer(o).inputs[0]].scale for o in graph.outputs]
    dtypes = [graph.tensors[graph.producer(o).inputs[0]].dtype for o in graph.outputs]
    for form in ("int", "qdq"):
        outs = ort(form)
        ident = [float((lsb(o, r, s) == 0).mean()) for o, r, s in zip(outs, ref, scales,
                                                                       strict=True)]
        worst = [int(lsb(o, r, s).max()) for o, r, s in zip(outs, ref, scales, strict=True)]
        for dt in sorted(set(dtypes)):
            idx = [i for i, d in enumerate(dtypes) if d == dt]
            print(f"  {form:5s} vs int_infer, {len(idx)} {dt} outputs: identical "
                  f"min {100 * min(ident[i] for i in idx):.3f} %, max |d| "
                  f"{max(worst[i] for i in idx)} LSB")
    with torch.no_grad():
        from torch.utils import _pytree as pytree

        flat = pytree.tree_leaves(net(x))
    err = max(float(np.abs(o - f.numpy()).max()) for o, f in zip(ort("float"), flat, strict=True))
    print(f"  float ORT vs torch eager: max |d| {err:.2e} over {len(flat)} outputs")


if __name__ == "__main__":
    main()
