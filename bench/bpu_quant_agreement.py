"""Fake-quant model vs its integer graph (hat_bpu.ir.reference), on EfficientNet-Lite0 features.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bpu_quant_agreement.py --size 96 --batch 4

Random weights with non-trivial BN statistics, calibrated (percentile) on random YUV-like input;
reports the output's |difference| in units of its scale per march scale policy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from hat_bpu.ir.reference import run_ir
from hat_bpu.plugin import BpuTargetSpec, HorizonQuantizeSpec, quantize
from hat_bpu.quant.convert import convert

from hatcore import quant


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from bpu_quant import EfficientNetLite0

    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = EfficientNetLite0().eval()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randint(0, 256, (args.batch, 3, args.size, args.size)).float().sub(128).div(128)
    for march in ("bayes-e", "bernoulli2"):
        spec = HorizonQuantizeSpec(type="horizon", observer="percentile")
        target = BpuTargetSpec(type="bpu", march=march)
        q = quantize(model=net, spec=spec, stage="calibration", target=target)
        quant.set_mode(q, "observe")
        q(x)
        quant.set_mode(q, "fake_quant")
        t0 = time.perf_counter()
        graph = convert(q, x[:1])
        t_convert = time.perf_counter() - t0
        with torch.no_grad():
            ref = q(x).numpy()
        got = run_ir(graph, x.numpy())[0]
        scale = graph.tensors[graph.producer(graph.outputs[0]).inputs[0]].scale
        lsb = np.abs(got - ref) / scale
        print(json.dumps({"march": march, "nodes": len(graph.nodes), "elements": int(lsb.size),
                          "convert_s": round(t_convert, 3), "max_lsb": float(lsb.max()),
                          "identical": float((lsb < 0.5).mean()),
                          "within_1_lsb": float((lsb < 1.5).mean())}))


if __name__ == "__main__":
    main()
