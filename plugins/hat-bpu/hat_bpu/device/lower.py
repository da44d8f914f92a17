"""The compiler proper: an integer graph (:mod:`hat_bpu.ir`) → a device :class:`Program`.

Passes, in order:

1. **Instruction selection** - one instruction per IR node (``dequantize`` becomes the host's
   output step); a conv's requantization is its epilogue.
2. **Fusion** (``opt_level >= 1``) - a ``requantize``, ``add`` or ``relu`` whose input is read
   by nothing else (and is not a graph output) becomes a stage of the instruction producing
   that input: conv + add + relu is one instruction, a requantize folds into its producer's
   epilogue, and a relu that follows a requant stage folds into its clip. The fused
   instruction runs where its last node ran (its other operands are ready there).
3. **Layout** - 4-D tensors padded to the march's MAC alignment, conv weights and per-channel
   parameters padded to match (:mod:`hat_bpu.device.program`).
4. **Exactness** - each conv's accumulator and each stage's sum bounded from the weights and the
   operands' ranges: the arithmetic that is provably exact is recorded (``arith``).
5. **Buffer assignment** - tensor lifetimes → buffers, best fit: ``opt_level 0`` gives every
   tensor its own buffer, ``1`` reuses buffers of dead tensors, ``2`` also writes an
   elementwise result over an operand read for the last time (in place).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from hat_bpu.device.program import (
    BUFFER_ALIGN,
    Instr,
    Output,
    Program,
    Stage,
    TensorInfo,
    check_schedule,
    in_place_ok,
)
from hat_bpu.ir import graph as ir
from hatcore.errors import UserError

F32_EXACT = 2.0**24
F64_EXACT = 2.0**53
_ABS_MAX = {"int8": 128, "int16": 32768, "int32": 2**31}
ELEMENTWISE = ("requantize", "add", "relu")


def _stored(shape: list[int], align: int) -> list[int]:
    shape = [1, *shape[1:]] if shape else shape
    if len(shape) == 4:
        shape = [1, math.ceil(shape[1] / align) * align, *shape[2:]]
    return shape


def _pad(a: np.ndarray, n: int, axis: int = 0) -> np.ndarray:
    if a.shape[axis] == n:
        return np.ascontiguousarray(a)
    width = [(0, 0)] * a.ndim
    width[axis] = (0, n - a.shape[axis])
    return np.pad(a, width)


class _Lowering:
    def __init__(self, graph: ir.Graph, align: int, opt_level: int) -> None:
        self.g, self.align, self.opt = graph, align, opt_level
        self.instrs: list[Instr] = []
        self.producer: dict[str, Instr] = {}
        self.bound: dict[str, float] = {}  # instruction name → |register| bound after its stages
        self.uses: dict[str, int] = {}
        for n in graph.nodes:
            for t in n.inputs:
                self.uses[t] = self.uses.get(t, 0) + 1
        for n in graph.nodes:
            if n.op == "dequantize":
                self.uses[n.inputs[0]] = self.uses.get(n.inputs[0], 0) + 1000  # an output
        self.tensors = {t.name: TensorInfo(t.name, [1, *t.shape[1:]] if t.shape else [],
                                           _stored(list(t.shape), align), t.dtype, t.scale)
                        for t in graph.tensors.values()}

    def channels(self, t: str) -> int:
        return self.tensors[t].stored[1] if len(self.tensors[t].stored) == 4 else 1

    def run(self) -> tuple[list[Instr], list[Output]]:
        outputs = []
        for n in self.g.nodes:
            if n.op == "dequantize":
                src = self.tensors[n.inputs[0]]
                if src.dtype == "float32" or src.scale is None:
                    raise UserError(f"node {n.name!r}: dequantize of a float tensor")
                outputs.append(Output(n.outputs[0], n.inputs[0], float(src.scale)))
                continue
            if n.op == "quantize" and n.inputs[0] not in self.g.inputs:
                raise UserError(f"node {n.name!r}: the device program quantizes only the graph "
                                "input")
            if self.opt >= 1 and n.op in ELEMENTWISE and self.fuse(n):
                continue
            ins = self.select(n)
            self.instrs.append(ins)
            self.producer[n.outputs[0]] = ins
        by_name = {o.name: o for o in outputs}
        for t in self.g.outputs:
            if t not in by_name:
                raise UserError(f"graph output {t!r} is not a dequantize output")
        return self.instrs, [by_name[t] for t in self.g.outputs]

    # ---------------------------------------------------------------- selection
    def select(self, n: ir.Node) -> Instr:
        out = n.outputs[0]
        for t in n.inputs:
            if self.tensors[t].dtype == "float32" and n.op != "quantize":
                raise UserError(f"node {n.name!r} reads the float tensor {t!r}")
        if n.op == "conv2d":
            return self.conv(n)
        if n.op in ELEMENTWISE:
            ins = Instr("load", n.name, [n.name], list(n.inputs), out)
            self.bound[ins.name] = _ABS_MAX[self.tensors[n.inputs[0]].dtype]
            self.add_stage(ins, n, {k: k if k else -1 for k in range(len(n.inputs))})
            return ins
        attrs = dict(n.attrs)
        params: dict[str, np.ndarray] = {}
        if n.op == "concat":
            params = {"m": np.asarray(n.params["m"], np.int64),
                      "shift": np.asarray(n.params["shift"], np.int64)}
            attrs["arith"] = ["f64" if _ABS_MAX[self.tensors[t].dtype] * abs(int(m)) < F64_EXACT
                              else "i64" for t, m in zip(n.inputs, params["m"], strict=True)]
        elif n.op == "quantize":
            attrs["scale"] = float(self.tensors[out].scale or 1.0)
        if n.op in ("concat", "quantize"):  # the head saturates to its own node's type, which a
            attrs["dtype"] = self.tensors[out].dtype  # fused requantize may change for `output`
        ins = Instr(n.op, n.name, [n.name], list(n.inputs), out, attrs, params)
        self.bound[ins.name] = _ABS_MAX[self.tensors[out].dtype]
        return ins

    def conv(self, n: ir.Node) -> Instr:
        p, a = n.params, dict(n.attrs)
        x, out = n.inputs[0], n.outputs[0]
        w = np.asarray(p["weight"], np.int8)
        o, i_g = int(w.shape[0]), int(w.shape[1])
        groups = int(a["groups"])
        cin = int(self.g.tensors[x].shape[1])
        c_in, c_out = self.channels(x), self.channels(out)
        if groups == 1:
            layout, wp = "dense", _pad(_pad(w, c_out, 0), c_in, 1)
        elif groups == cin == o and i_g == 1:
            layout, wp = "depthwise", _pad(w, c_out, 0)
        else:
            layout, wp = "grouped", w
        bias = np.asarray(p["bias"], np.int64)
        acc = _ABS_MAX[self.tensors[x].dtype] * np.abs(w.astype(np.float64)).reshape(o, -1).sum(1) \
            + np.abs(bias.astype(np.float64))
        if float(acc.max()) <= F32_EXACT:
            arith = "f32"
        elif float(acc.max()) < F64_EXACT:
            arith = "f64"
        else:
            raise UserError(f"conv {n.name!r}: its accumulator may reach {acc.max():.3g} "
                            "(> 2**53): not supported by the device program")
        a.update(layout=layout, weight_shape=list(w.shape))
        ins = Instr("conv2d", n.name, [n.name], list(n.inputs[:1]), out, a,
                    {"weight": wp, "bias": _pad(bias.astype(np.int32), c_out)}, arith=arith)
        terms = {0: -1}
        if len(n.inputs) > 1:
            ins.inputs.append(n.inputs[1])
            terms[1] = 1
        self.bound[ins.name] = float(acc.max())
        self.add_stage(ins, n, terms, per_channel=c_out)
        return ins

    # ---------------------------------------------------------------- epilogue
    def add_stage(self, ins: Instr, n: ir.Node, terms: dict[int, int],
                  per_channel: int | None = None) -> None:
        """Append node ``n`` as a stage; ``terms`` maps n's input index → stage term (-1: the
        register, else an index into ``ins.inputs``)."""
        reg = self.bound[ins.name]
        out = self.tensors[n.outputs[0]]
        if n.op == "relu":
            last = ins.stages[-1] if ins.stages else None
            if self.opt >= 1 and last is not None and last.op == "requant" \
                    and last.bounds()[1] >= 0:
                last.clip = [max(0, last.bounds()[0]), last.bounds()[1]]
                last.node += f"+{n.name}"
                last.src += "+relu"
            else:
                ins.stages.append(Stage("relu", n.name, "relu"))
            return
        p = n.params
        if n.op == "conv2d":
            ms = [np.asarray(p["m"], np.int64)] + ([np.asarray(p["m_res"], np.int64)]
                                                  if len(n.inputs) > 1 else [])
            shift = np.asarray(p["shift"], np.int64)
        else:
            m = np.asarray(p["m"], np.int64)
            ms = [m[i:i + 1] for i in range(len(n.inputs))]
            shift = np.asarray(p["shift"], np.int64)[:1]
        if per_channel is not None:
            ms = [_pad(v, per_channel) for v in ms]
            shift = _pad(shift, per_channel)
        order = [terms[k] for k in range(len(n.inputs))]
        total = 0.0
        for k, mk in zip(order, ms, strict=True):
            mx = float(np.abs(mk.astype(np.float64)).max())
            total += mx * (reg if k < 0 else _ABS_MAX[self.tensors[ins.inputs[k]].dtype])
        st = Stage("requant", n.name, n.op, order, ms, shift, out.dtype,
                   list(n.attrs["clip"]) if n.attrs.get("clip") else None,
                   "f64" if total < F64_EXACT else "i64")
        ins.stages.append(st)
        lo, hi = st.bounds()
        self.bound[ins.name] = float(max(abs(lo), abs(hi)))

    def fuse(self, n: ir.Node) -> bool:
        """Fuse elementwise node ``n`` into the producer of one of its inputs; False if none
        qualifies."""
        cands = [j for j, t in enumerate(n.inputs)
                 if t in self.producer and self.uses.get(t) == 1 and t not in self.g.outputs]
        if not cands:
            return False
        j = next((j for j in cands if self.producer[n.inputs[j]].op == "conv2d"), cands[0])
        if self.tensors[n.inputs[j]].stored != self.tensors[n.outputs[0]].stored:
            return False
        if len(n.inputs) > 1 and self.producer[n.inputs[j]].op == "concat":
            return False  # a concat head's inputs are its parts, one per multiplier: no others
        ins = self.producer.pop(n.inputs[j])
        self.instrs.remove(ins)
        terms: dict[int, int] = {}
        for k, t in enumerate(n.inputs):
            if k == j:
                terms[k] = -1
            else:
                ins.inputs.append(t)
                terms[k] = len(ins.inputs) - 1
        self.add_stage(ins, n, terms)
        ins.nodes.append(n.name)
        ins.output = n.outputs[0]
        self.instrs.append(ins)
        self.producer[ins.output] = ins
        return True


def _assign_buffers(prog: Program) -> None:
    """Best-fit buffer assignment over the lifetimes (module docstring, pass 5)."""
    life = prog.lifetimes()
    sizes: list[int] = []
    free: list[int] = []
    dying: dict[int, list[str]] = {}
    for t, (_, end) in life.items():
        dying.setdefault(end, []).append(t)
    for i, ins in enumerate(prog.instrs):
        out = prog.tensors[ins.output]
        need = -(-out.nbytes // BUFFER_ALIGN) * BUFFER_ALIGN
        b = None
        if prog.opt_level >= 2:
            for t in dying.get(i, []):
                if t != ins.output and in_place_ok(prog, ins, t):
                    b = prog.tensors[t].buffer
                    break
        if b is None and prog.opt_level >= 1 and free:
            fits = [f for f in free if sizes[f] >= need]
            b = min(fits, key=lambda f: sizes[f]) if fits else max(free, key=lambda f: sizes[f])
            free.remove(b)
        if b is None:
            b = len(sizes)
            sizes.append(0)
        sizes[b] = max(sizes[b], need)
        out.buffer = b
        for t in dying.get(i, []):
            tb = prog.tensors[t].buffer
            if tb is not None and tb != b and tb not in free:
                free.append(tb)
        if life[ins.output][1] == i and b not in free:  # written, never read
            free.append(b)
    prog.buffers = sizes


def lower(graph: ir.Graph, march: Any, opt_level: int) -> Program:
    """The device program of ``graph`` for ``march`` (a :class:`~hat_bpu.device.march.March`).

    :raises UserError: an op or tensor the device program cannot hold (named).
    """
    if opt_level not in (0, 1, 2):
        raise UserError(f"[compile] opt_level = {opt_level!r}: expected 0, 1 or 2")
    graph.validate()
    if len(graph.inputs) != 1:
        raise UserError(f"the device program takes one input; the graph has {graph.inputs}")
    align = math.lcm(*(int(v) for v in march.mac_align))
    low = _Lowering(graph, align, opt_level)
    instrs, outputs = low.run()
    used = {graph.inputs[0]} | {t for i in instrs for t in [*i.inputs, i.output]}
    tensors = {k: v for k, v in low.tensors.items() if k in used}
    for o in outputs:
        tensors[o.tensor] = low.tensors[o.tensor]
    for k in ("weight_shape",):
        for ins in instrs:
            if k in ins.attrs:
                ins.attrs[k] = [int(v) for v in ins.attrs[k]]
    prog = Program(march.name, opt_level, align, tensors, graph.inputs[0], outputs, instrs, [],
                   {k: v for k, v in graph.meta.items()})
    _assign_buffers(prog)
    problems = check_schedule(prog)
    if problems:  # a compiler bug, not a user mistake
        raise AssertionError("unsafe buffer plan: " + "; ".join(problems[:5]))
    return prog
