"""THE op table of the integer IR: one record per op — semantics, march rule, cost, kernels.

Everything that dispatches on an IR op reads this table: :meth:`hat_bpu.ir.graph.Graph.validate`
(known ops), the fast simulator (``simulate``), the literal int64 reference (``reference``), the
compiler's march check (``check``) and the perf model (``cost``). A new op is one new record
here plus its two kernels; nothing else has a list of ops.

Notation in ``semantics``: ``x``, ``y`` integer inputs/outputs; ``sat`` clamps to the output
tensor's dtype range; ``round_shift(v, s) = round_half_even(v / 2**s)``
(:func:`hat_bpu.quant.qspec.round_shift`); params are numpy arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from hat_bpu.ir import graph as ir
from hat_bpu.ir import reference, simulator


class Limits(Protocol):
    """What a march rule reads (:class:`hat_bpu.device.march.March` provides it)."""

    name: str
    max_kernel: int
    max_stride: int
    max_channels: int


#: the cost of one node: ``(operations, unit)``; unit ``mac`` (the MAC array) or ``vector``.
CostFn = Callable[[ir.Node, ir.Graph], tuple[int, str]]
CheckFn = Callable[[ir.Node, ir.Graph, Limits], list[str]]


@dataclass(frozen=True)
class OpDef:
    """One IR op.

    :param name: the op name stored in ``Node.op``.
    :param semantics: exactly what it computes (the contract of both kernels).
    :param simulate: ``(node, tensors, simulator) -> fn(inputs) -> output``, the fast kernel.
    :param reference: ``(node, int64 inputs, tensors) -> int64 output``, the literal kernel.
    :param cost: ``(node, graph) -> (ops, unit)``; None: free (a view, or host/DMA work).
    :param check: ``(node, graph, limits) -> reasons`` the march cannot run it (empty: it can).
    """

    name: str
    semantics: str
    simulate: Callable[..., simulator.OpFn]
    reference: Callable[..., np.ndarray]
    cost: CostFn | None = None
    check: CheckFn | None = None


def _numel(g: ir.Graph, name: str) -> int:
    return int(np.prod(g.tensors[name].shape))


def _elementwise(n: ir.Node, g: ir.Graph) -> tuple[int, str]:
    return _numel(g, n.outputs[0]) * max(1, len(n.inputs)), "vector"


def _conv_cost(n: ir.Node, g: ir.Graph) -> tuple[int, str]:
    _, i_g, kh, kw = (int(v) for v in n.params["weight"].shape)
    return 2 * _numel(g, n.outputs[0]) * i_g * kh * kw, "mac"


def _pool_cost(n: ir.Node, g: ir.Graph) -> tuple[int, str]:
    return _numel(g, n.outputs[0]) * int(np.prod(n.attrs["kernel"])), "vector"


def _conv_check(n: ir.Node, g: ir.Graph, lim: Limits) -> list[str]:
    o, i_g, kh, kw = (int(v) for v in n.params["weight"].shape)
    bad = []
    if max(kh, kw) > lim.max_kernel:
        bad.append(f"kernel {kh}x{kw} > {lim.max_kernel}")
    if max(n.attrs["stride"]) > lim.max_stride:
        bad.append(f"stride {list(n.attrs['stride'])} > {lim.max_stride}")
    if max(o, i_g * int(n.attrs["groups"])) > lim.max_channels:
        bad.append(f"channels {i_g * int(n.attrs['groups'])}->{o} > {lim.max_channels}")
    return bad


def _pool_check(n: ir.Node, g: ir.Graph, lim: Limits) -> list[str]:
    k = max(n.attrs["kernel"])
    return [f"kernel {k} > {lim.max_kernel}"] if k > lim.max_kernel else []


_TABLE = [
    OpDef("quantize", "inputs [x_float] -> y = sat(rint(x / out.scale)) (float input, e.g. the "
          "graph input; the BPU input (p - 128) at scale 1/128 is exact).",
          simulator.sim_quantize, reference.ref_quantize),
    OpDef("dequantize", "inputs [x] -> float32 y = x * in.scale.",
          simulator.sim_dequantize, reference.ref_dequantize),
    OpDef("conv2d", "inputs [x] or [x, res]; attrs stride (sh, sw), padding (ph, pw) (zeros, "
          "symmetric), dilation (dh, dw), groups, act (none/relu/relu6), clip ([lo, hi] or None); "
          "params weight int8 [O, I/groups, kh, kw], bias int32 [O] (at scale s_in * s_w[o]), "
          "m int64 [O], shift int64 [O] and, with a residual, m_res int64 [O]; w_scale float64 "
          "[O] (info). acc[o] = sum(x * weight[o]) + bias[o]; v = acc * m[o] (+ res * m_res[o]); "
          "y = sat(clip(round_shift(v, shift[o]))).",
          simulator.sim_conv2d, reference.ref_conv2d, _conv_cost, _conv_check),
    OpDef("add", "inputs [a, b, ...]; params m int64 [n_inputs], shift int64 [1]; attrs act, "
          "clip: y = sat(clip(round_shift(sum_i x_i * m[i], shift))).",
          simulator.sim_add, reference.ref_add, _elementwise),
    OpDef("concat", "inputs [x_0, ...], attrs axis; params m, shift int64 [n_inputs]: "
          "y = cat_i(sat(round_shift(x_i * m[i], shift[i]))) along axis.",
          simulator.sim_concat, reference.ref_concat, _elementwise),
    OpDef("requantize", "inputs [x]; params m, shift int64 [1]; attrs act, clip: "
          "y = sat(clip(round_shift(x * m, shift))) (a standalone activation, a dtype change, or "
          "a multiplication by a constant folded into m; m may then be negative).",
          simulator.sim_requantize, reference.ref_requantize, _elementwise),
    OpDef("maxpool", "inputs [x]; attrs kernel, stride, padding (pairs; padding counts as "
          "-infinity), ceil_mode: window maximum; output scale == input scale.",
          simulator.sim_maxpool, reference.ref_maxpool, _pool_cost, _pool_check),
    OpDef("upsample_nearest", "inputs [x]; attrs scale (integer pair (fh, fw)): each pixel "
          "repeated fh x fw; output scale == input scale.",
          simulator.sim_upsample_nearest, reference.ref_upsample_nearest, _elementwise),
    OpDef("relu", "inputs [x]: max(x, 0); output scale == input scale.",
          simulator.sim_relu, reference.ref_relu, _elementwise),
    OpDef("reshape", "inputs [x]; attrs shape (without the batch dimension): "
          "y = x.reshape(x.shape[0], *shape) (row-major, values unchanged).",
          simulator.sim_reshape, reference.ref_reshape),
    OpDef("permute", "inputs [x]; attrs dims: y = x.transpose(dims) (values unchanged; the "
          "bytes move).", simulator.sim_permute, reference.ref_permute, _elementwise),
]
OPS: dict[str, OpDef] = {d.name: d for d in _TABLE}


def op_def(op: str, where: str = "") -> OpDef:
    """The record of ``op``.

    :raises ValueError: an unknown op, naming the node (``where``) and the known ops.
    """
    try:
        return OPS[op]
    except KeyError:
        raise ValueError(f"node {where!r}: unknown op {op!r}; expected one of "
                         f"{', '.join(OPS)}") from None


def check_graph(graph: ir.Graph, limits: Limits, ops: tuple[str, ...] | None = None
                ) -> list[str]:
    """Every reason ``graph`` cannot run on a march: ops it lacks, then per-node rules."""
    problems = [f"{n.name}: op {n.op!r} is not run by {limits.name}"
                for n in graph.nodes if ops is not None and n.op not in ops]
    for n in graph.nodes:
        rule = op_def(n.op, n.name).check
        problems += [f"{n.name}: {r}" for r in (rule(n, graph, limits) if rule else [])]
    return problems


def describe() -> list[dict[str, Any]]:
    """The table as plain rows (docs, ``hat info``): name, semantics, cost unit, has a rule."""
    return [{"op": d.name, "semantics": d.semantics, "costed": d.cost is not None,
             "march_rule": d.check is not None} for d in _TABLE]
