"""Device-side filtering of a dense detection head's outputs (DESIGN: FCOS details).

The deployed program keeps the head's outputs as integers (int16 for FCOS) and, before anything
leaves the device, drops every point whose class logits are all at or below the logit of the
score threshold: ``logit(0.05) = ln(0.05 / 0.95) ≈ -2.944``, compared **in the integer domain**
with the output tensor's scale. Only the surviving points go to DDR (their index and every
output channel of that point: class logits, box distances, centerness); the host decoder
rebuilds dense maps in which absent points have logit ``-inf`` (score 0) and zero box/centerness.

Integer threshold (scale ``s > 0`` of the class output, threshold ``p``)::

    keep q  <=>  sigmoid(q s) > p  <=>  q s > logit(p)  <=>  q > T,   T = floor(logit(p) / s)

computed in float64; a logit exactly on the boundary (``q s == logit(p)``) is dropped, as the
host's ``sigmoid(x) > p`` drops it. Per-channel scales give one ``T`` per class channel.

The layout it applies to: the model's output is a tuple/list of groups, each a list of per-level
``Tensor[B, K, H, W]`` maps with the same levels and sizes in every group; the first group holds
the class logits (FCOS: ``(cls, bbox, centerness)``). :func:`plan` derives that from the graph;
other outputs are left dense.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from hat_bpu.ir import graph as ir

DEFAULT_SCORE_THR = 0.05
INDEX_BYTES = 4  # a survivor's position in its level (int32), sent with its values
COUNT_BYTES = 4  # survivors per level and image (int32)
DTYPE_BYTES = {"int8": 1, "int16": 2, "int32": 4}


def logit(p: float) -> float:
    """``ln(p / (1 - p))``; ``logit(0.05) ≈ -2.944``."""
    if not 0 < p < 1:
        raise ValueError(f"a score threshold must lie in (0, 1), got {p}")
    return math.log(p / (1 - p))


def int_threshold(score_thr: float, scale: float) -> int:
    """``T``: a class output ``q`` (integer, scale ``scale``) survives when ``q > T``."""
    return math.floor(logit(score_thr) / scale)


def plan(graph: ir.Graph, score_thr: float = DEFAULT_SCORE_THR) -> dict[str, Any] | None:
    """The filter of ``graph``'s outputs (stored in the ``.hbm`` header), or None when its
    outputs are not groups of per-level maps (then nothing is filtered).

    :returns: ``score_thr``, ``groups`` (flat output indices, group x level; group 0: class
        logits), ``scale`` and ``dtype`` per flat output, ``threshold`` per class output
        (an int, or a list per channel).
    """
    n = len(graph.outputs)
    tree = graph.unflatten_outputs(list(range(n)))
    if not isinstance(tree, (list, tuple)) or len(tree) < 2 or \
            not all(isinstance(g, (list, tuple)) and g for g in tree):
        return None
    groups = [list(g) for g in tree]
    if len({len(g) for g in groups}) != 1 or not all(isinstance(i, int) for g in groups for i in g):
        return None
    shapes = [graph.tensors[o].shape for o in graph.outputs]
    for lv in range(len(groups[0])):
        sizes = {tuple(shapes[g[lv]][-2:]) for g in groups}
        if len(sizes) != 1 or any(len(shapes[g[lv]]) != 4 for g in groups):
            return None
    scales: list[Any] = []
    dtypes: list[str] = []
    for o in graph.outputs:  # each output is a dequantize of an integer tensor
        src = _dequantized(graph, o)
        if src is None or src.scale is None:
            return None
        sc = np.asarray(src.scale, np.float64)
        scales.append(float(sc) if sc.ndim == 0 else sc.tolist())
        dtypes.append(src.dtype)
    thresholds: list[Any] = []
    for i in groups[0]:
        sc = np.asarray(scales[i], np.float64)
        thresholds.append(int_threshold(score_thr, float(sc)) if sc.ndim == 0
                          else [int_threshold(score_thr, float(s)) for s in sc])
    return {"score_thr": score_thr, "groups": groups, "scale": scales, "dtype": dtypes,
            "threshold": thresholds}


def _dequantized(graph: ir.Graph, out: str) -> ir.Tensor | None:
    for n in graph.nodes:
        if out in n.outputs:
            return graph.tensors[n.inputs[0]] if n.op == "dequantize" else None
    return None


def to_integers(flat: list[torch.Tensor], filt: dict[str, Any]) -> list[torch.Tensor]:
    """The runtime's float32 outputs back to the program's integers (``q = x / s``, exact).

    :raises RuntimeError: an output off its integer grid (a runtime that did not dequantize).
    """
    out = []
    for x, s in zip(flat, filt["scale"], strict=True):
        sc = _channel(s, x)
        q = torch.round(x.double() / sc)
        if not torch.equal((q * sc).float(), x.float()):
            raise RuntimeError("a runtime output is not an integer times its scale")
        out.append(q.long())
    return out


def _channel(s: Any, x: torch.Tensor) -> torch.Tensor:
    t = torch.tensor(s, dtype=torch.float64)
    return t.view(1, -1, 1, 1) if t.dim() == 1 else t


def keep_mask(q_cls: torch.Tensor, threshold: Any) -> torch.Tensor:
    """Integer class logits Tensor[B, C, H, W] → survivors Tensor[B, H, W] bool (any class
    above its integer threshold)."""
    t = torch.tensor(threshold, dtype=torch.long)
    t = t.view(1, -1, 1, 1) if t.dim() == 1 else t
    return (q_cls > t).any(1)


class Survivors:
    """What leaves the device for one batch: per group and level, the surviving points'
    integer values Tensor[B_i, K] (one row per survivor) and their flat positions."""

    def __init__(self, q: list[torch.Tensor], filt: dict[str, Any]) -> None:
        self.filt = filt
        self.levels: list[tuple[torch.Tensor, list[torch.Tensor], tuple[int, ...]]] = []
        groups = filt["groups"]
        for lv, ci in enumerate(groups[0]):
            mask = keep_mask(q[ci], filt["threshold"][lv])  # [B, H, W]
            where = mask.nonzero()  # [S, 3]: image, y, x
            values = [q[g[lv]][where[:, 0], :, where[:, 1], where[:, 2]] for g in groups]
            self.levels.append((where, values, tuple(q[ci].shape[-2:])))
        self.batch = q[groups[0][0]].shape[0]

    def count(self) -> int:
        """Surviving points in the batch, all levels."""
        return sum(len(w) for w, _, _ in self.levels)

    def nbytes(self) -> int:
        """DDR bytes of the filtered outputs: per survivor its index and every channel of every
        group; per image and level a survivor count."""
        groups, dt = self.filt["groups"], self.filt["dtype"]
        total = self.batch * len(self.levels) * COUNT_BYTES
        for lv, (where, values, _) in enumerate(self.levels):
            per_point = INDEX_BYTES + sum(v.shape[1] * DTYPE_BYTES[dt[g[lv]]]
                                          for g, v in zip(groups, values, strict=True))
            total += len(where) * per_point
        return total

    def to_dense(self) -> list[torch.Tensor]:
        """The host's view: flat float32 outputs as the program's dequantize gives them, with
        absent points at logit ``-inf`` (class group) and 0 (the other groups)."""
        groups, n = self.filt["groups"], sum(len(g) for g in self.filt["groups"])
        flat: list[torch.Tensor] = [torch.empty(0)] * n
        for lv, (where, values, (h, w)) in enumerate(self.levels):
            for gi, (g, v) in enumerate(zip(groups, values, strict=True)):
                i = g[lv]
                fill = -math.inf if gi == 0 else 0.0
                dense = torch.full((self.batch, v.shape[1], h, w), fill, dtype=torch.float32)
                sc = torch.tensor(self.filt["scale"][i], dtype=torch.float64).reshape(1, -1)
                dense[where[:, 0], :, where[:, 1], where[:, 2]] = (v.double() * sc).float()
                flat[i] = dense
        return flat


def dense_nbytes(flat: list[torch.Tensor], filt: dict[str, Any]) -> int:
    """DDR bytes of the unfiltered outputs: every element at its integer width."""
    return sum(x.numel() * DTYPE_BYTES[d] for x, d in zip(flat, filt["dtype"], strict=True))
