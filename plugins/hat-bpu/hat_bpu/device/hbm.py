"""The modelled compiler: ``.hbir`` → ``.hbm`` (program + march-laid-out weights + quant params).

``.hbm`` layout (little-endian; docs/formats.md, format version 1)::

    magic      8 bytes  b"HATHBM\\0\\0"
    version    uint32   HBM_VERSION
    head_len   uint64
    header     JSON: format, march, opt_level, input_layout, input_shape, output_tree,
               sections [{name, offset, length}], body_len, body_sha256
    body       sections back to back (64-byte aligned):
               program  UTF-8 JSON: tensors, inputs, outputs, meta and the instruction list
                        (one per IR node; params point into the weights/quant sections)
               weights  conv weights int8, ``[O_pad, I_pad, kh, kw]`` with O and I/groups
                        (dense convs) padded with zeros to the march's MAC alignment
               quant    bias int32, multipliers/shifts int64 (per channel, unpadded)

Every load verifies the body's sha256: a tampered or truncated file is refused.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from hat_bpu.device import perf
from hat_bpu.device.march import get_march
from hat_bpu.ir import graph as ir
from hat_bpu.ir import hbir
from hat_bpu.ir.ops import check_graph
from hatcore.errors import UserError

MAGIC = b"HATHBM\0\0"
HBM_VERSION = 1


def _pad_weight(w: np.ndarray, groups: int, align: tuple[int, int]) -> np.ndarray:
    """Zero-pad O (and I for dense convs) of an int8 weight ``[O, I/g, kh, kw]``."""
    o, i = w.shape[:2]
    o_pad = math.ceil(o / align[1]) * align[1] if groups == 1 else o
    i_pad = math.ceil(i / align[0]) * align[0] if groups == 1 else i
    out = np.zeros((o_pad, i_pad, *w.shape[2:]), np.int8)
    out[:o, :i] = w
    return out


def compile_graph(graph: ir.Graph, march_name: str, opt_level: int = 2,
                  input_layout: str = "nv12") -> tuple[dict[str, Any], bytes]:
    """The ``.hbm`` header and body of ``graph`` for ``march_name``."""
    march = get_march(march_name)
    problems = check_graph(graph, march, march.ops)
    if problems:
        raise UserError(f"march {march_name!r} cannot run this graph: " + "; ".join(problems[:8])
                        + (f" (+{len(problems) - 8} more)" if len(problems) > 8 else ""))
    weights: list[np.ndarray] = []
    quant: list[np.ndarray] = []
    prog_header, _ = hbir.graph_to_header(ir.Graph(graph.tensors, [], graph.inputs,
                                                   graph.outputs, graph.meta))
    instrs = []
    for n in graph.nodes:
        params: dict[str, Any] = {}
        for k, a in n.params.items():
            a = np.asarray(a)
            if k == "weight" and opt_level >= 1:
                padded = _pad_weight(a, int(n.attrs.get("groups", 1)), march.mac_align)
                params[k] = {"section": "weights", "index": len(weights), "dtype": "int8",
                             "shape": list(padded.shape), "logical_shape": list(a.shape)}
                weights.append(padded)
            else:
                sec, lst = ("weights", weights) if k == "weight" else ("quant", quant)
                params[k] = {"section": sec, "index": len(lst), "dtype": str(a.dtype),
                             "shape": list(a.shape), "logical_shape": list(a.shape)}
                lst.append(a)
        instrs.append({"op": n.op, "name": n.name, "inputs": n.inputs, "outputs": n.outputs,
                       "attrs": n.attrs, "params": params})
    wbody, woff = hbir.pack_arrays(weights)
    qbody, qoff = hbir.pack_arrays(quant)
    for ins in instrs:
        for p in ins["params"].values():
            p["offset"] = (woff if p["section"] == "weights" else qoff)[p.pop("index")]
    program = json.dumps({**prog_header, "instructions": instrs}, sort_keys=True).encode()
    sections, body = [], b""
    for name, data in (("program", program), ("weights", wbody), ("quant", qbody)):
        body += b"\0" * ((-len(body)) % 64)
        sections.append({"name": name, "offset": len(body), "length": len(data)})
        body += data
    header = {"format": "hbm", "march": march.name, "opt_level": opt_level,
              "input_layout": input_layout,
              "input_shape": graph.tensors[graph.inputs[0]].shape,
              "output_tree": graph.meta.get("output_tree"), "sections": sections}
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


def load_hbm(path: Path) -> tuple[dict[str, Any], ir.Graph]:
    """Read and verify a ``.hbm``; returns (header, the graph with unpadded weights).

    :raises UserError: bad magic, unknown version, truncated or tampered file.
    """
    where = str(path)
    _, header, body = hbir.read_container(Path(path), MAGIC, (HBM_VERSION,))
    try:
        prog = json.loads(_section(header, body, "program", where))
    except ValueError:
        raise UserError(f"{where}: program section is not valid JSON") from None
    secs = {s: _section(header, body, s, where) for s in ("weights", "quant")}
    nodes = []
    for ins in prog["instructions"]:
        params = {}
        for k, p in ins["params"].items():
            a = hbir.array_at(secs[p["section"]], p["dtype"], p["shape"], p["offset"],
                              f"{where}: {ins['name']} {k}")
            params[k] = a[tuple(slice(0, d) for d in p["logical_shape"])].copy()
        nodes.append({**ins, "params": {}})
        nodes[-1]["_arrays"] = params
    graph = hbir.graph_from_header({**prog, "nodes": [
        {k: v for k, v in nd.items() if k != "_arrays"} for nd in nodes]}, b"", where)
    for node, nd in zip(graph.nodes, nodes, strict=True):
        node.params = nd["_arrays"]
    return header, graph


def is_hbm(path: Path) -> bool:
    """True when ``path`` starts with the ``.hbm`` magic."""
    return hbir.has_magic(path, MAGIC)


def describe_hbm(path: Path) -> str:
    """``hat info model.hbm``: header, sections and the program summary (verifies the file)."""
    header, graph = load_hbm(path)
    secs = ", ".join(f"{s['name']} {s['length']} B" for s in header["sections"])
    return (f"{path}: HBM v{HBM_VERSION} program for march {header['march']} (checksum ok)\n"
            f"opt_level {header['opt_level']}, input {header['input_shape']} "
            f"({header['input_layout']}), sections: {secs}\n" + hbir.describe_graph(graph))
