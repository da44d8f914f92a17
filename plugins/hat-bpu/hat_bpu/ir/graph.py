"""The in-memory integer graph that :func:`hat_bpu.convert.convert` produces.

The exporter serialises it (``.hbir``), the simulator and compiled runtime execute it. Nodes are
in topological order; tensors are NCHW. A quantized tensor holds integers ``q`` with
``real = q * scale`` (symmetric, per tensor); the rules and the reference requantization are in
:mod:`hat_bpu.qspec` (rounding: half to even). All arithmetic below is exact integer arithmetic
(int64 in the reference), ``sat`` clamps to the output tensor's dtype range.

What each op computes — and its kernels, march rule and cost — is the op table
:mod:`hat_bpu.ir.ops` (``OPS[name].semantics``).

Graph outputs are the ``dequantize`` outputs (float32); ``meta["output_tree"]`` is the
``torch.utils._pytree`` spec (``treespec_dumps``) that rebuilds the model's ``forward`` output
structure from the flat output list (:meth:`Graph.unflatten_outputs`).

The simulator must agree with the fake-quant model within 1 LSB on >= 99.9% of elements.
Changes to this module are additive only (new ops, new optional fields).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

TENSOR_DTYPES = ("int8", "int16", "int32", "float32")


@dataclass
class Tensor:
    """One value of the graph.

    :param name: unique name.
    :param shape: NCHW (or whatever rank the value has) with the batch of the example input.
    :param dtype: ``int8``, ``int16``, ``int32`` (quantized, ``real = q * scale``) or ``float32``.
    :param scale: the per-tensor scale of a quantized tensor (None for float32).
    """

    name: str
    shape: list[int]
    dtype: str
    scale: float | None = None


@dataclass
class Node:
    """One integer op (see the module docstring for its exact semantics).

    :param op: a name of the op table :data:`hat_bpu.ir.ops.OPS`.
    :param name: unique name; the fused float module's qualified name where there is one
        (``backbone.stem.conv``), so reports can point back at the model.
    :param inputs: input tensor names, in the order the op defines.
    :param outputs: output tensor names (one for every current op).
    :param attrs: plain JSON-able attributes (ints, lists, strings).
    :param params: numpy arrays (weights int8, bias int32, multipliers/shifts int64).
    """

    op: str
    name: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    params: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class Graph:
    """A topologically ordered integer graph.

    :param tensors: every tensor by name.
    :param nodes: ops in execution order.
    :param inputs: graph input tensor names (float32, NCHW).
    :param outputs: graph output tensor names (float32, dequantized), flat.
    :param meta: ``march``, ``pow2_scales``, ``output_tree`` (pytree spec string), ``version``.
    """

    tensors: dict[str, Tensor]
    nodes: list[Node]
    inputs: list[str]
    outputs: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    def producer(self, tensor: str) -> Node | None:
        """The node writing ``tensor`` (None for a graph input)."""
        for n in self.nodes:
            if tensor in n.outputs:
                return n
        return None

    def validate(self) -> None:
        """Raise ValueError when the graph is not well formed (unknown op/tensor, order)."""
        from hat_bpu.ir.ops import OPS

        known = set(self.inputs)
        for t in self.inputs:
            if t not in self.tensors:
                raise ValueError(f"graph input {t!r} has no tensor entry")
        for n in self.nodes:
            if n.op not in OPS:
                raise ValueError(f"node {n.name!r}: unknown op {n.op!r}")
            for t in n.inputs:
                if t not in known:
                    raise ValueError(f"node {n.name!r} reads {t!r} before it is written")
            for t in n.outputs:
                if t not in self.tensors:
                    raise ValueError(f"node {n.name!r} writes {t!r}, which has no tensor entry")
                if self.tensors[t].dtype not in TENSOR_DTYPES:
                    raise ValueError(f"tensor {t!r}: bad dtype {self.tensors[t].dtype!r}")
                known.add(t)
        for t in self.outputs:
            if t not in known:
                raise ValueError(f"graph output {t!r} is never written")

    def unflatten_outputs(self, values: list[Any]) -> Any:
        """Rebuild the model's output structure (tuple/list/dict) from flat output values."""
        tree = self.meta.get("output_tree")
        if tree is None:
            return values[0] if len(values) == 1 else tuple(values)
        from torch.utils import _pytree as pytree

        return pytree.tree_unflatten(list(values), pytree.treespec_loads(tree))

    def summary(self) -> dict[str, Any]:
        """Op counts, parameter bytes, inputs and outputs (JSON-able)."""
        ops: dict[str, int] = {}
        nbytes = 0
        for n in self.nodes:
            ops[n.op] = ops.get(n.op, 0) + 1
            nbytes += sum(int(p.nbytes) for p in n.params.values())
        return {"ops": ops, "nodes": len(self.nodes), "param_bytes": nbytes,
                "inputs": {t: self.tensors[t].shape for t in self.inputs},
                "outputs": {t: self.tensors[t].shape for t in self.outputs}}
