"""The device program of a ``.hbm``: instructions, the padded tensor layout and the buffer plan.

What :func:`hat_bpu.device.lower.lower` produces from an integer graph, what ``.hbm`` stores
(docs/formats.md) and what :class:`hat_bpu.device.runtime.Runtime` executes.

* **Layout.** Every 4-D activation (batch 1: the device runs one frame at a time) is stored
  NHWC with its channel axis zero-padded to ``align`` (the march's MAC alignment); ``stored``
  gives its NCHW shape. Other ranks are stored as they are, row-major. Pad channels hold zeros.
  Dense conv weights are ``[O_pad, I_pad, kh, kw]``, depthwise ones ``[C_pad, 1, kh, kw]``
  (zeros in the pads); other grouped convs keep ``[O, I/groups, kh, kw]`` and read the logical
  channels.
* **Instruction** = a head (``conv2d``, ``maxpool``, ``upsample_nearest``, ``concat``,
  ``reshape``, ``permute``, ``quantize`` or ``load``: read input 0) that leaves an integer
  value in the "register", then an epilogue of stages applied to it before the one write of
  ``output``:

  - ``requant``: ``reg = sat(clip(round_shift(Σ_j term_j · m_j, shift)))``; a term is the
    register (``-1``) or ``inputs[k]`` (an operand read from memory: a conv's residual, the
    other summands of an add). ``m_j`` and ``shift`` have one value or one per stored channel.
  - ``relu``: ``reg = max(reg, 0)``.

  A conv's own requantization is its first stage; with fusion, a following ``requantize``,
  ``add`` or ``relu`` of the IR becomes a further stage (the intermediate tensor never reaches
  memory). ``arith`` says how the compiler proved the arithmetic exact: a conv accumulates in
  ``f32`` (every partial sum ``<= 2**24``) or ``f64`` (``< 2**53``); a stage runs in ``f64``
  when ``Σ|term|·|m| < 2**53`` is guaranteed by the operands' ranges, else in ``i64``.
* **Buffers.** Each device tensor lives in one buffer (``tensor.buffer``) from the instruction
  writing it to the last one reading it (graph outputs: to the end); tensors whose lifetimes do
  not overlap share a buffer. An instruction may write over an elementwise operand that it reads
  for the last time (same stored shape and element size: ``opt_level 2``).
  :func:`check_schedule` proves a plan safe; the loader refuses any other.
* **Outputs.** The device writes integer tensors; the host dequantizes them
  (``float32(q · scale)``, the product in float64) into the graph's flat outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

HEADS = ("conv2d", "maxpool", "upsample_nearest", "concat", "reshape", "permute", "quantize",
         "load")
STAGES = ("requant", "relu")
ITEMSIZE = {"int8": 1, "int16": 2, "int32": 4, "float32": 4}
QRANGE = {"int8": (-128, 127), "int16": (-32768, 32767), "int32": (-(2**31), 2**31 - 1)}
BUFFER_ALIGN = 64


@dataclass
class TensorInfo:
    """One value: logical ``shape`` (batch 1), ``stored`` (the padded device layout), dtype,
    scale, and its buffer (None: the host's float input)."""

    name: str
    shape: list[int]
    stored: list[int]
    dtype: str
    scale: float | None
    buffer: int | None = None

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.stored)) * ITEMSIZE[self.dtype]


@dataclass
class Stage:
    """One epilogue step (module docstring). ``terms``: -1 the register, k ``inputs[k]``;
    ``m``: one int64 array per term; ``node``/``src``: the IR node and op it comes from."""

    op: str
    node: str
    src: str
    terms: list[int] = field(default_factory=list)
    m: list[np.ndarray] = field(default_factory=list)
    shift: np.ndarray | None = None
    dtype: str = "int8"
    clip: list[int] | None = None
    arith: str = "f64"

    def bounds(self) -> tuple[int, int]:
        """The integer range ``[lo, hi]`` a requant stage clamps to (sat ∩ clip)."""
        lo, hi = QRANGE[self.dtype]
        if self.clip:
            lo, hi = max(lo, int(self.clip[0])), min(hi, int(self.clip[1]))
        return lo, hi


@dataclass
class Instr:
    """One device instruction: a head, its epilogue, one output. ``nodes``: the IR nodes it
    executes (more than one: fused)."""

    op: str
    name: str
    nodes: list[str]
    inputs: list[str]
    output: str
    attrs: dict[str, Any] = field(default_factory=dict)
    params: dict[str, np.ndarray] = field(default_factory=dict)
    stages: list[Stage] = field(default_factory=list)
    arith: str = ""

    def elementwise_inputs(self) -> list[int]:
        """Indices of inputs read element for element at the output's position (in-place
        candidates): a load's input 0 and every stage operand."""
        idx = {0} if self.op == "load" else set()
        for st in self.stages:
            idx |= {k for k in st.terms if k >= 0}
        return sorted(idx)


@dataclass
class Output:
    """A graph output: the float ``name`` the host computes from device tensor ``tensor``."""

    name: str
    tensor: str
    scale: float


@dataclass
class Program:
    """A compiled program (module docstring)."""

    march: str
    opt_level: int
    align: int
    tensors: dict[str, TensorInfo]
    input: str
    outputs: list[Output]
    instrs: list[Instr]
    buffers: list[int]
    meta: dict[str, Any] = field(default_factory=dict)

    def lifetimes(self) -> dict[str, tuple[int, int]]:
        """``(first, last)`` instruction index of every device tensor (outputs: to the end)."""
        life: dict[str, list[int]] = {}
        for i, ins in enumerate(self.instrs):
            for t in ins.inputs:
                if t in life:
                    life[t][1] = i
            life[ins.output] = [i, i]
        for o in self.outputs:
            life[o.tensor][1] = len(self.instrs)
        return {t: (a, b) for t, (a, b) in life.items()}

    def peak_bytes(self) -> int:
        """Largest sum of live activation bytes at any instruction (a buffer shared in place
        counts once)."""
        life = self.lifetimes()
        peak = 0
        for i in range(len(self.instrs)):
            per_buf: dict[int, int] = {}
            for t, (a, b) in life.items():
                if a <= i <= b:
                    info = self.tensors[t]
                    key = info.buffer if info.buffer is not None else -1
                    per_buf[key] = max(per_buf.get(key, 0), info.nbytes)
            peak = max(peak, sum(per_buf.values()))
        return peak

    def stats(self) -> dict[str, Any]:
        """What ``hat info`` and ``perf.json`` report about the program (JSON-able)."""
        heads: dict[str, int] = {}
        fused: dict[str, int] = {}
        for ins in self.instrs:
            heads[ins.op] = heads.get(ins.op, 0) + 1
            if len(ins.nodes) > 1:
                key = fused_name(ins)
                fused[key] = fused.get(key, 0) + 1
        wbytes = sum(int(p.nbytes) for ins in self.instrs for k, p in ins.params.items()
                     if k == "weight")
        logical = sum(int(np.prod(ins.attrs.get("weight_shape", []))) for ins in self.instrs
                      if "weight" in ins.params)
        return {"instructions": len(self.instrs),
                "ir_nodes": sum(len(i.nodes) for i in self.instrs),
                "fused_instructions": sum(len(i.nodes) > 1 for i in self.instrs),
                "heads": heads, "fused": fused, "buffers": len(self.buffers),
                "buffer_bytes": int(sum(self.buffers)), "peak_activation_bytes": self.peak_bytes(),
                "weight_bytes": wbytes, "weight_bytes_logical": logical,
                "channel_align": self.align}


def fused_name(ins: Instr) -> str:
    """``conv2d+add+relu``: the head's IR op followed by each fused stage's IR op."""
    first = ins.stages[0].src if ins.op == "load" and ins.stages else ins.op
    rest = [s.src for s in ins.stages[1:]] if ins.op in ("load", "conv2d") else \
        [s.src for s in ins.stages]
    return "+".join([first, *rest])


def check_schedule(prog: Program) -> list[str]:
    """Every reason the buffer plan of ``prog`` is unsafe (empty: safe). Checked: every read
    tensor is written before (or is the host input), every device tensor has a buffer large
    enough, and no two tensors whose lifetimes overlap share a buffer, except an output written
    over an elementwise operand read for the last time by the same instruction."""
    bad: list[str] = []
    known = {prog.input}
    for i, ins in enumerate(prog.instrs):
        for t in ins.inputs:
            if t not in known:
                bad.append(f"instruction {i} ({ins.name}) reads {t!r} before it is written")
        known.add(ins.output)
    for o in prog.outputs:
        if o.tensor not in known:
            bad.append(f"output {o.name!r}: tensor {o.tensor!r} is never written")
    if bad:
        return bad
    life = prog.lifetimes()
    by_buf: dict[int, list[str]] = {}
    for t in life:
        info = prog.tensors[t]
        if info.buffer is None or not 0 <= info.buffer < len(prog.buffers):
            bad.append(f"tensor {t!r}: buffer {info.buffer!r} is not one of the "
                       f"{len(prog.buffers)} buffers")
        elif prog.buffers[info.buffer] < info.nbytes:
            bad.append(f"tensor {t!r} ({info.nbytes} B) does not fit buffer {info.buffer} "
                       f"({prog.buffers[info.buffer]} B)")
        else:
            by_buf.setdefault(info.buffer, []).append(t)
    for b, names in by_buf.items():
        names.sort(key=lambda t: life[t])
        for prev, nxt in zip(names, names[1:], strict=False):
            (_, end), (start, _) = life[prev], life[nxt]
            if start > end:
                continue
            ins = prog.instrs[start]
            ok = start == end and ins.output == nxt and in_place_ok(prog, ins, prev)
            if not ok:
                bad.append(f"buffer {b}: {prev!r} (live {life[prev]}) and {nxt!r} "
                           f"(live {life[nxt]}) overlap")
    return bad


def in_place_ok(prog: Program, ins: Instr, t: str) -> bool:
    """True when ``ins`` may write its output over ``t``: ``t`` is read only as elementwise
    operands of ``ins``, with the output's stored shape and element size."""
    ew = set(ins.elementwise_inputs())
    reads = [k for k, name in enumerate(ins.inputs) if name == t]
    a, b = prog.tensors[t], prog.tensors[ins.output]
    return bool(reads) and all(k in ew for k in reads) and a.stored == b.stored and \
        ITEMSIZE[a.dtype] == ITEMSIZE[b.dtype]
