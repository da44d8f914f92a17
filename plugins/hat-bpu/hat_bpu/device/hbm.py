"""The modelled compiler's file: ``.hbir`` → ``.hbm`` (the device program of
:mod:`hat_bpu.device.program`, lowered by :mod:`hat_bpu.device.lower`).

``.hbm`` layout (little-endian; docs/formats.md, format version 3)::

    magic      8 bytes  b"HATHBM\\0\\0"
    version    uint32   HBM_VERSION
    head_len   uint64
    header     JSON: format, march, opt_level, input_layout, input_shape, output_tree,
               program (its statistics), sections [{name, offset, length}], body_len,
               body_sha256
    body       sections back to back (64-byte aligned):
               program  UTF-8 JSON: march, opt_level, align, tensors (logical and stored shape,
                        dtype, scale, buffer), buffers (bytes), input, outputs, meta and the
                        instructions (head, inputs, output, attrs, params, epilogue stages)
               weights  conv weights int8 in the device layout (padded, as executed)
               quant    biases int32, multipliers and shifts int64 (padded per stored channel)

Every load verifies the body's sha256 (a tampered or truncated file is refused) and the
program: references, shapes, and the safety of its buffer plan.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from hat_bpu.device import perf
from hat_bpu.device.lower import lower
from hat_bpu.device.march import get_march
from hat_bpu.device.program import (
    HEADS,
    ITEMSIZE,
    QRANGE,
    Instr,
    Output,
    Program,
    Stage,
    TensorInfo,
    check_schedule,
    fused_name,
)
from hat_bpu.ir import graph as ir
from hat_bpu.ir import hbir
from hat_bpu.ir.ops import check_graph
from hatcore.errors import UserError

MAGIC = b"HATHBM\0\0"
HBM_VERSION = 3
#: largest multiplier magnitude a stage may hold: a conv's are < 2**31, a bayes-family add's
#: integer weight (<= 2**14) times its multiplier goes beyond; below 2**48 an int16 term times
#: it stays inside int64
MAX_MULT = 2**48


class _Arrays:
    """Arrays of one section, packed at the end."""

    def __init__(self, name: str) -> None:
        self.name, self.arrays = name, []  # type: ignore[var-annotated]

    def ref(self, a: np.ndarray) -> dict[str, Any]:
        a = np.ascontiguousarray(a)
        self.arrays.append(a)
        return {"section": self.name, "dtype": str(a.dtype), "shape": list(a.shape),
                "index": len(self.arrays) - 1}


def program_to_json(prog: Program) -> tuple[dict[str, Any], bytes, bytes]:
    """The program section (JSON-able) and the weights and quant sections of ``prog``."""
    weights, quant = _Arrays("weights"), _Arrays("quant")
    instrs = []
    for ins in prog.instrs:
        stages = [{"op": st.op, "node": st.node, "src": st.src, "terms": st.terms,
                   "m": [quant.ref(m) for m in st.m],
                   "shift": quant.ref(st.shift) if st.shift is not None else None,
                   "dtype": st.dtype, "clip": st.clip, "arith": st.arith} for st in ins.stages]
        params = {k: (weights if k == "weight" else quant).ref(v) for k, v in ins.params.items()}
        instrs.append({"op": ins.op, "name": ins.name, "nodes": ins.nodes, "inputs": ins.inputs,
                       "output": ins.output, "attrs": ins.attrs, "arith": ins.arith,
                       "params": params, "stages": stages})
    wbody, woff = hbir.pack_arrays(weights.arrays)
    qbody, qoff = hbir.pack_arrays(quant.arrays)

    def place(ref: dict[str, Any] | None) -> None:
        if ref is not None:
            ref["offset"] = (woff if ref["section"] == "weights" else qoff)[ref.pop("index")]
    for ins_j in instrs:
        for ref in ins_j["params"].values():
            place(ref)
        for st in ins_j["stages"]:
            for ref in st["m"]:
                place(ref)
            place(st["shift"])
    doc = {"march": prog.march, "opt_level": prog.opt_level, "align": prog.align,
           "tensors": [vars(t) for t in prog.tensors.values()], "buffers": prog.buffers,
           "input": prog.input, "outputs": [vars(o) for o in prog.outputs],
           "meta": prog.meta, "instructions": instrs}
    return doc, wbody, qbody


def compile_graph(graph: ir.Graph, march_name: str, opt_level: int = 2,
                  input_layout: str = "nv12") -> tuple[dict[str, Any], bytes]:
    """The ``.hbm`` header and body of ``graph`` for ``march_name``."""
    march = get_march(march_name)
    problems = check_graph(graph, march, march.ops)
    if problems:
        raise UserError(f"march {march_name!r} cannot run this graph: " + "; ".join(problems[:8])
                        + (f" (+{len(problems) - 8} more)" if len(problems) > 8 else ""))
    prog = lower(graph, march, opt_level)
    doc, wbody, qbody = program_to_json(prog)
    program = json.dumps(doc, sort_keys=True).encode()
    sections, body = [], b""
    for name, data in (("program", program), ("weights", wbody), ("quant", qbody)):
        body += b"\0" * ((-len(body)) % 64)
        sections.append({"name": name, "offset": len(body), "length": len(data)})
        body += data
    header = {"format": "hbm", "march": march.name, "opt_level": opt_level,
              "input_layout": input_layout,
              "input_shape": graph.tensors[graph.inputs[0]].shape,
              "output_tree": graph.meta.get("output_tree"), "program": prog.stats(),
              "sections": sections}
    return header, body


def compile_file(artifact: Path, march_name: str, out_dir: Path, opt_level: int = 2,
                 input_layout: str = "nv12") -> dict[str, Any]:
    """``.hbir`` → ``out_dir/model.hbm`` + ``perf.json`` + ``perf.html``; returns the perf dict."""
    t0 = time.perf_counter()
    graph = hbir.load_hbir(Path(artifact))
    header, body = compile_graph(graph, march_name, opt_level, input_layout)
    out_dir = Path(out_dir)
    hbir.write_container(out_dir / "model.hbm", MAGIC, HBM_VERSION, header, body)
    estimate = perf.estimate(graph, get_march(march_name))
    estimate["compile_s"] = round(time.perf_counter() - t0, 3)
    estimate["program"] = header["program"]
    estimate["hbm"] = str(out_dir / "model.hbm")
    (out_dir / "perf.json").write_text(json.dumps(estimate, indent=1))
    (out_dir / "perf.html").write_text(perf.to_html(estimate))
    (out_dir / "perf.txt").write_text(perf.table(estimate) + "\n")
    return estimate


def _section(header: dict[str, Any], body: bytes, name: str, where: str) -> bytes:
    for s in header.get("sections", []):
        if s["name"] == name:
            return body[s["offset"]:s["offset"] + s["length"]]
    raise UserError(f"{where}: no {name!r} section")


def load_hbm(path: Path) -> tuple[dict[str, Any], Program]:
    """Read and verify a ``.hbm``; returns (header, the program with its padded arrays).

    :raises UserError: bad magic, unknown version, truncated or tampered file, or a program
        that does not hold together (a reference, a shape, an unsafe buffer plan).
    """
    where = str(path)
    _, header, body = hbir.read_container(Path(path), MAGIC, (HBM_VERSION,))
    try:
        prog = _program(header, body, where)
        problems = _check(prog) or check_schedule(prog)
        prog.stats()
    except hbir.MALFORMED as exc:
        raise UserError(f"{where}: malformed program ({exc!r} missing or wrong)") from None
    if problems:
        raise UserError(f"{where}: invalid program: " + "; ".join(problems[:5]))
    return header, prog


def _program(header: dict[str, Any], body: bytes, where: str) -> Program:
    try:
        doc = json.loads(_section(header, body, "program", where))
    except ValueError:
        raise UserError(f"{where}: program section is not valid JSON") from None
    secs = {s: _section(header, body, s, where) for s in ("weights", "quant")}

    def arr(ref: dict[str, Any], what: str) -> np.ndarray:
        if ref["section"] not in secs:
            raise UserError(f"{where}: {what}: unknown section {ref['section']!r}")
        return hbir.array_at(secs[ref["section"]], ref["dtype"], list(ref["shape"]),
                             int(ref["offset"]), f"{where}: {what}")
    tensors = {}
    for t in doc["tensors"]:
        info = TensorInfo(str(t["name"]), [int(v) for v in t["shape"]],
                          [int(v) for v in t["stored"]], str(t["dtype"]),
                          None if t["scale"] is None else float(t["scale"]),
                          None if t["buffer"] is None else int(t["buffer"]))
        tensors[info.name] = info
    instrs = []
    for j in doc["instructions"]:
        name = str(j["name"])
        stages = [Stage(str(s["op"]), str(s["node"]), str(s["src"]), [int(k) for k in s["terms"]],
                        [arr(m, f"{name} stage m") for m in s["m"]],
                        None if s["shift"] is None else arr(s["shift"], f"{name} stage shift"),
                        str(s["dtype"]), None if s["clip"] is None else [int(v) for v in s["clip"]],
                        str(s["arith"])) for s in j["stages"]]
        instrs.append(Instr(str(j["op"]), name, [str(v) for v in j["nodes"]],
                            [str(v) for v in j["inputs"]], str(j["output"]), dict(j["attrs"]),
                            {k: arr(r, f"{name} {k}") for k, r in j["params"].items()},
                            stages, str(j["arith"])))
    outputs = [Output(str(o["name"]), str(o["tensor"]), float(o["scale"])) for o in doc["outputs"]]
    return Program(str(doc["march"]), int(doc["opt_level"]), int(doc["align"]), tensors,
                   str(doc["input"]), outputs, instrs, [int(b) for b in doc["buffers"]],
                   dict(doc["meta"]))


def _check(prog: Program) -> list[str]:
    """What must hold for the runtime to execute ``prog`` (shapes, ranges, references)."""
    bad: list[str] = []
    t = prog.tensors
    if prog.input not in t or t[prog.input].dtype != "float32":
        return [f"input {prog.input!r} is not a float32 tensor"]
    for info in t.values():
        if info.dtype not in ITEMSIZE or len(info.stored) != len(info.shape) or any(
                s < d or d < 0 for s, d in zip(info.stored, info.shape, strict=True)):
            bad.append(f"tensor {info.name!r}: bad dtype or stored shape")
    for i, ins in enumerate(prog.instrs):
        where = f"instruction {i} ({ins.name})"
        names = [*ins.inputs, ins.output]
        if ins.op not in HEADS or not ins.inputs or any(n not in t for n in names):
            bad.append(f"{where}: unknown head {ins.op!r} or tensor")
            continue
        out = t[ins.output]
        if out.dtype not in QRANGE or (ins.op != "quantize" and any(
                t[n].dtype not in QRANGE for n in ins.inputs)):
            bad.append(f"{where}: a device tensor must be int8/int16/int32")
        if ins.op in ("load", "maxpool", "upsample_nearest") and \
                len(t[ins.inputs[0]].stored) != (4 if ins.op != "load" else len(out.stored)):
            bad.append(f"{where}: input rank")
        if ins.op == "conv2d":
            bad += _check_conv(ins, t, where)
        if ins.op == "concat" and (len(ins.params.get("m", [])) != len(ins.inputs)
                                   or len(ins.params.get("shift", [])) != len(ins.inputs)
                                   or len(ins.attrs.get("arith", [])) != len(ins.inputs)):
            bad.append(f"{where}: concat parameters do not match its inputs")
        if ins.op in ("concat", "quantize") and ins.attrs.get("dtype") not in QRANGE:
            bad.append(f"{where}: {ins.op} needs its own type (attrs.dtype int8/int16/int32)")
        for st in ins.stages:
            bad += _check_stage(st, ins, t, where)
    for o in prog.outputs:
        if o.tensor not in t or t[o.tensor].dtype not in QRANGE:
            bad.append(f"output {o.name!r}: unknown device tensor {o.tensor!r}")
    return bad


def _check_conv(ins: Instr, t: dict[str, TensorInfo], where: str) -> list[str]:
    w, b = ins.params.get("weight"), ins.params.get("bias")
    x, out = t[ins.inputs[0]], t[ins.output]
    if w is None or b is None or w.ndim != 4 or len(x.stored) != 4 or len(out.stored) != 4:
        return [f"{where}: conv needs a 4-D weight, a bias and 4-D tensors"]
    layout = ins.attrs.get("layout")
    want = {"dense": (out.stored[1], x.stored[1]), "depthwise": (out.stored[1], 1)}.get(layout)
    if layout == "depthwise" and x.stored[1] != out.stored[1]:
        want = None
    if layout == "grouped":
        g = int(ins.attrs["groups"])
        want = (w.shape[0], x.shape[1] // g) if g > 0 and w.shape[0] <= out.stored[1] else None
    if want is None or tuple(w.shape[:2]) != want or b.shape != (out.stored[1],) or \
            ins.arith not in ("f32", "f64"):
        return [f"{where}: weight {list(w.shape)} does not fit the {layout!r} layout of "
                f"{x.stored} -> {out.stored}"]
    return []


def _check_stage(st: Stage, ins: Instr, t: dict[str, TensorInfo], where: str) -> list[str]:
    out = t[ins.output]
    if st.op == "relu":
        return []
    ch = out.stored[1] if len(out.stored) == 4 else 1
    ok = st.op == "requant" and st.shift is not None and st.dtype in QRANGE and \
        st.arith in ("f64", "i64") and len(st.terms) == len(st.m) and \
        all(-1 <= k < len(ins.inputs) for k in st.terms) and \
        all(m.ndim == 1 and m.shape[0] in (1, ch) for m in [*st.m, st.shift]) and \
        all(t[ins.inputs[k]].stored == out.stored for k in st.terms if k >= 0) and \
        int(st.shift.min(initial=0)) >= 0 and int(st.shift.max(initial=0)) <= 62 and \
        all(int(np.abs(m).max(initial=0)) < MAX_MULT for m in st.m) and \
        (st.clip is None or len(st.clip) == 2)
    return [] if ok else [f"{where}: stage {st.node!r} does not fit its instruction"]


def is_hbm(path: Path) -> bool:
    """True when ``path`` starts with the ``.hbm`` magic."""
    return hbir.has_magic(path, MAGIC)


def describe_hbm(path: Path) -> str:
    """``hat info model.hbm``: header, sections and the fused program (verifies the file)."""
    header, prog = load_hbm(path)
    try:
        secs = ", ".join(f"{s['name']} {s['length']} B" for s in header["sections"])
        head = (f"{path}: HBM v{HBM_VERSION} program for march {header['march']} (checksum ok)\n"
                f"opt_level {header['opt_level']}, input {header['input_shape']} "
                f"({header['input_layout']}), sections: {secs}")
    except hbir.MALFORMED as exc:
        raise UserError(f"{path}: malformed header ({exc!r} missing or wrong)") from None
    try:
        return head + "\n" + describe_program(prog)
    except hbir.MALFORMED as exc:
        raise UserError(f"{path}: malformed program ({exc!r} missing or wrong)") from None


def describe_program(prog: Program) -> str:
    """The program as ``hat info`` lists it: totals, fused patterns, buffers, instructions."""
    s = prog.stats()
    mib = 1 / 2**20
    fused = ", ".join(f"{k} ×{v}" for k, v in sorted(s["fused"].items(), key=lambda kv: -kv[1]))
    lines = [f"instructions: {s['instructions']} for {s['ir_nodes']} IR nodes "
             f"({s['fused_instructions']} fused{': ' + fused if fused else ''})",
             f"weights: {s['weight_bytes']} B in the device layout (channels padded to "
             f"{s['channel_align']}; {s['weight_bytes_logical']} B unpadded)",
             f"buffers: {s['buffers']}, {s['buffer_bytes'] * mib:.2f} MiB allocated; "
             f"peak live activations {s['peak_activation_bytes'] * mib:.2f} MiB",
             f"input  {prog.input}: {prog.tensors[prog.input].shape} float32 (host)"]
    lines += [f"output {o.name}: {prog.tensors[o.tensor].shape} {prog.tensors[o.tensor].dtype} "
              f"x {o.scale:.6g} (dequantized on the host)" for o in prog.outputs]
    lines.append("  #  instruction                  node (first)                      "
                 "reads -> writes [buffer]  epilogue")
    for i, ins in enumerate(prog.instrs):
        out = prog.tensors[ins.output]
        epi = " ".join(f"{st.op}({st.src},{st.arith})" if st.op == "requant" else "relu"
                       for st in ins.stages)
        kind = fused_name(ins) + (f" {ins.arith}" if ins.arith else "")
        lines.append(f"{i:3d}  {kind:<28} {ins.name[-32:]:<33} {len(ins.inputs)} -> "
                     f"{out.dtype}{out.stored} [b{out.buffer}]  {epi}")
    return "\n".join(lines)
