"""A slow, literal executor of :mod:`hat_bpu.ir` — the op semantics of its docstring as code.

It exists to test the quantizer's conversion (fake quant vs integers) and as a reference the
fast simulator can be checked against; it is not the simulator.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from hat_bpu.ir import graph as ir
from hat_bpu.quant import qspec


def run_ir(graph: ir.Graph, x: np.ndarray, env_out: dict[str, np.ndarray] | None = None
           ) -> list[np.ndarray]:
    """Execute ``graph`` on the float input ``x`` (NCHW); returns the flat float32 outputs.

    Integer arithmetic throughout (int64 arrays); convolutions and max-pools run in float64,
    exact while every partial sum stays below 2**53 (int8 × int16 products over any realistic
    reduction length). ``env_out``, when given, receives every tensor by name.
    """
    env: dict[str, np.ndarray] = {graph.inputs[0]: x} if env_out is None else env_out
    env[graph.inputs[0]] = x
    t = graph.tensors
    for n in graph.nodes:
        xs = [env[i] for i in n.inputs]
        out = t[n.outputs[0]]
        p, a = n.params, n.attrs
        clip = tuple(a["clip"]) if a.get("clip") else None
        if n.op == "quantize":
            y = qspec.quantize_np(xs[0], float(out.scale or 1.0), out.dtype)
        elif n.op == "dequantize":
            y = (xs[0] * t[n.inputs[0]].scale).astype(np.float32)
        elif n.op == "conv2d":
            acc = F.conv2d(torch.from_numpy(xs[0]).double(),
                           torch.from_numpy(p["weight"].astype(np.float64)),
                           torch.from_numpy(p["bias"].astype(np.float64)), a["stride"],
                           a["padding"], a["dilation"], a["groups"]).numpy().astype(np.int64)
            v = acc * p["m"].reshape(1, -1, 1, 1)
            if len(xs) > 1:
                v = v + xs[1] * p["m_res"].reshape(1, -1, 1, 1)
            y = qspec.requantize(v, 1, p["shift"].reshape(1, -1, 1, 1), out.dtype, clip)
        elif n.op == "add":
            v = sum(xi * mi for xi, mi in zip(xs, p["m"], strict=True))
            y = qspec.requantize(v, 1, p["shift"][0], out.dtype, clip)
        elif n.op == "concat":
            y = np.concatenate([qspec.requantize(xi, m, s, out.dtype)
                                for xi, m, s in zip(xs, p["m"], p["shift"], strict=True)], a["axis"])
        elif n.op == "requantize":
            y = qspec.requantize(xs[0], p["m"][0], p["shift"][0], out.dtype, clip)
        elif n.op == "maxpool":
            y = F.max_pool2d(torch.from_numpy(xs[0]).double(), a["kernel"], a["stride"],
                             a["padding"], ceil_mode=a["ceil_mode"]).numpy().astype(np.int64)
        elif n.op == "upsample_nearest":
            y = xs[0].repeat(a["scale"][0], 2).repeat(a["scale"][1], 3)
        elif n.op == "relu":
            y = np.maximum(xs[0], 0)
        elif n.op == "reshape":
            y = xs[0].reshape(xs[0].shape[0], *a["shape"])
        elif n.op == "permute":
            y = np.ascontiguousarray(xs[0].transpose(a["dims"]))
        else:
            raise ValueError(f"node {n.name!r}: unknown op {n.op!r}")
        env[n.outputs[0]] = y
    return [env[o] for o in graph.outputs]
