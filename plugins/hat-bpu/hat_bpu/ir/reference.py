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
    from hat_bpu.ir.ops import op_def

    for n in graph.nodes:
        env[n.outputs[0]] = op_def(n.op, n.name).reference(n, [env[i] for i in n.inputs], t)
    return [env[o] for o in graph.outputs]


Tensors = dict[str, ir.Tensor]


def _clip(n: ir.Node) -> tuple[int, int] | None:
    return tuple(n.attrs["clip"]) if n.attrs.get("clip") else None  # type: ignore[return-value]


def ref_quantize(n: ir.Node, xs: list[np.ndarray], t: Tensors) -> np.ndarray:
    out = t[n.outputs[0]]
    return qspec.quantize_np(xs[0], float(out.scale or 1.0), out.dtype)


def ref_dequantize(n: ir.Node, xs: list[np.ndarray], t: Tensors) -> np.ndarray:
    return (xs[0] * t[n.inputs[0]].scale).astype(np.float32)


def ref_conv2d(n: ir.Node, xs: list[np.ndarray], t: Tensors) -> np.ndarray:
    p, a = n.params, n.attrs
    acc = F.conv2d(torch.from_numpy(xs[0]).double(), torch.from_numpy(p["weight"].astype(np.float64)),
                   torch.from_numpy(p["bias"].astype(np.float64)), a["stride"], a["padding"],
                   a["dilation"], a["groups"]).numpy().astype(np.int64)
    v = acc * p["m"].reshape(1, -1, 1, 1)
    if len(xs) > 1:
        v = v + xs[1] * p["m_res"].reshape(1, -1, 1, 1)
    return qspec.requantize(v, 1, p["shift"].reshape(1, -1, 1, 1), t[n.outputs[0]].dtype, _clip(n))


def ref_add(n: ir.Node, xs: list[np.ndarray], t: Tensors) -> np.ndarray:
    v = sum(xi * mi for xi, mi in zip(xs, n.params["m"], strict=True))
    return qspec.requantize(v, 1, n.params["shift"][0], t[n.outputs[0]].dtype, _clip(n))


def ref_concat(n: ir.Node, xs: list[np.ndarray], t: Tensors) -> np.ndarray:
    p, dtype = n.params, t[n.outputs[0]].dtype
    return np.concatenate([qspec.requantize(xi, m, s, dtype)
                           for xi, m, s in zip(xs, p["m"], p["shift"], strict=True)], n.attrs["axis"])


def ref_requantize(n: ir.Node, xs: list[np.ndarray], t: Tensors) -> np.ndarray:
    p = n.params
    return qspec.requantize(xs[0], p["m"][0], p["shift"][0], t[n.outputs[0]].dtype, _clip(n))


def ref_maxpool(n: ir.Node, xs: list[np.ndarray], t: Tensors) -> np.ndarray:
    a = n.attrs
    return F.max_pool2d(torch.from_numpy(xs[0]).double(), a["kernel"], a["stride"], a["padding"],
                        ceil_mode=a["ceil_mode"]).numpy().astype(np.int64)


def ref_upsample_nearest(n: ir.Node, xs: list[np.ndarray], t: Tensors) -> np.ndarray:
    return xs[0].repeat(n.attrs["scale"][0], 2).repeat(n.attrs["scale"][1], 3)


def ref_relu(n: ir.Node, xs: list[np.ndarray], t: Tensors) -> np.ndarray:
    return np.maximum(xs[0], 0)


def ref_reshape(n: ir.Node, xs: list[np.ndarray], t: Tensors) -> np.ndarray:
    return xs[0].reshape(xs[0].shape[0], *n.attrs["shape"])


def ref_permute(n: ir.Node, xs: list[np.ndarray], t: Tensors) -> np.ndarray:
    return np.ascontiguousarray(xs[0].transpose(n.attrs["dims"]))
