"""Agreement of ONNX Runtime with HAT's own engines on a finished run (docs/onnx.md).

For a work dir where `hat run` has finished (export, onnx and onnx_float stages done):

* AP of every predict row (float, calibration, qat, int_infer, onnx_int, onnx_float, align_bpu)
  from their metrics.json, plus the QDQ form scored here the same way (ORT on model.qdq.onnx);
* per output tensor over the whole val set: ORT int (exact and QDQ forms) vs int_infer
  (% identical, max |d| in LSB of the tensor), ORT float vs the float model (max |d|);
* per op, teacher-forced (each node of model.qdq.onnx run alone on int_infer's own inputs, so
  the numbers show the float-scale requantization itself, not errors carried from upstream).

    OMP_NUM_THREADS=1 .venv/bin/python bench/onnx_agreement.py recipes/demo.toml [--set K=V ...]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np
import torch
from hat_bpu.ir.hbir import load_hbir
from hat_bpu.ir.reference import run_ir
from hat_bpu.ir.simulator import Simulator
from hat_onnx import hbir, lower
from hat_onnx.runtime import runner, session
from torch.utils import _pytree as pytree

from hatcore.pipeline import Pipeline
from hatcore.workdir import flat_scores, read_json

ROWS = ("float", "calibration", "qat", "int_infer", "onnx_int", "onnx_float", "align_bpu")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--forced-batches", type=int, default=1)
    args = ap.parse_args()
    pipe = Pipeline.load(args.recipe, args.overrides)
    wd = pipe.workdir
    src = pipe.artifact("export")
    g = hbir.read_hbir(src)
    graph = load_hbir(src)
    sim = Simulator(graph)
    onnx_dir = wd.stage("onnx")
    sess = {f: session(onnx_dir / f"model.{f}.onnx") for f in ("int", "qdq")}
    fsess = session(wd.stage("onnx_float") / "model.float.onnx")
    fmodel = pipe.load_stage_model("float").cpu().eval()
    deq = {n.outputs[0]: g.tensors[n.inputs[0]] for n in g.nodes if n.op == "dequantize"}

    print("## AP (COCO bbox AP on the val set, from predict/<row>/metrics.json)\n")
    print("| row | AP | AP50 |\n|---|---|---|")
    for row in ROWS:
        f = flat_scores(read_json(wd.predict_metrics(row)))
        if f:
            print(f"| {row} | {f['AP']:.4f} | {f['AP50']:.4f} |")
    model_q = pipe.build_model().eval()
    scores = flat_scores(pipe.evaluate(model_q, runner(onnx_dir / "model.qdq.onnx"),
                                       device=torch.device("cpu"), desc="qdq"))
    print(f"| onnx_qdq (this script, model.qdq.onnx) | {scores['AP']:.4f} | {scores['AP50']:.4f} |")

    same: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    worst: dict[tuple[str, str], float] = defaultdict(float)
    ferr = 0.0
    forced: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0, 0.0])
    for bi, batch in enumerate(pipe.loader("val")):
        img = batch["img"].float()
        ref = [r.numpy() for r in sim.run(img)]
        for form, s in sess.items():
            outs = s.run(None, {s.get_inputs()[0].name: img.numpy()})
            for name, o, r in zip(g.outputs, outs, ref, strict=True):
                d = np.rint(np.abs(o.astype(np.float64) - r) / deq[name].scale)
                same[(form, name)][0] += int((d == 0).sum())
                same[(form, name)][1] += d.size
                worst[(form, name)] = max(worst[(form, name)], float(d.max()))
        with torch.no_grad():
            flat = pytree.tree_leaves(fmodel(img))
        fo = fsess.run(None, {fsess.get_inputs()[0].name: img.numpy()})
        ferr = max(ferr, *(float(np.abs(a - b.numpy()).max()) for a, b in zip(fo, flat,
                                                                             strict=True)))
        if bi < args.forced_batches:
            env: dict[str, np.ndarray] = {}
            run_ir(graph, img.numpy(), env)
            for n in g.nodes:
                if n.op in ("quantize", "dequantize"):
                    continue
                sub = hbir.Hbir({t: g.tensors[t] for t in [*n.inputs, *n.outputs]}, [n],
                                list(dict.fromkeys(n.inputs)), list(n.outputs), {}, n.name)
                s = session(lower.to_onnx(sub, "qdq").SerializeToString(), 1)
                feed = {t: env[t].astype(g.tensors[t].dtype) for t in sub.inputs}
                y = s.run(None, feed)[0].astype(np.int64)
                d = np.abs(y - env[n.outputs[0]])
                key = (n.op + (" +res" if n.op == "conv2d" and len(n.inputs) > 1 else ""),
                       g.tensors[n.outputs[0]].dtype)
                forced[key][0] += int((d == 0).sum())
                forced[key][1] += d.size
                forced[key][2] = max(forced[key][2], float(d.max()))

    print("\n## Per output tensor, whole val set (LSB of the int tensor each output dequantizes)\n")
    print("| output | dtype | exact form: identical, max LSB | QDQ form: identical, max LSB |")
    print("|---|---|---|---|")
    for name in g.outputs:
        cells = [f"{100 * same[(f, name)][0] / same[(f, name)][1]:.3f} %, "
                 f"{worst[(f, name)]:.0f}" for f in ("int", "qdq")]
        print(f"| {name} | {deq[name].dtype} | {cells[0]} | {cells[1]} |")
    print(f"\nORT float vs the float model (torch eager), max |d| over every output: {ferr:.2e}")
    print(f"\n## QDQ form per op, teacher-forced ({args.forced_batches} val batch; every node "
          "alone on the integer model's inputs)\n")
    print("| op | out dtype | elements | identical | max LSB |\n|---|---|---|---|---|")
    for (op, dt), (ok, tot, mx) in sorted(forced.items()):
        print(f"| {op} | {dt} | {tot} | {100 * ok / tot:.4f} % | {mx:.0f} |")
    print("\n" + json.dumps({"qdq_ap": scores}, default=float))


if __name__ == "__main__":
    main()
