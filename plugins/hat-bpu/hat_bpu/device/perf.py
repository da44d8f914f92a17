"""The performance model of a *modelled* BPU: per-layer ops, bytes and time from the march table.

These are estimates of a modelled device, not measurements of Horizon hardware (docs/bpu.md).

Per layer (one IR node)::

    compute_s = ops / (peak_ops · utilisation)
    ddr_bytes = weights + max(0, activations + weights - SRAM)  (what does not fit spills)
    time_s    = max(compute_s, ddr_bytes / ddr_bandwidth) + layer_overhead

``utilisation`` of a convolution = ``peak_utilisation`` × channel alignment (``I/g`` and ``O``
padded to the march's MAC array, the fraction doing useful work) × a spatial factor
``min(1, Ho·Wo / 256)`` (small maps cannot fill the pipeline) × ``depthwise_efficiency`` for
depthwise convs, divided by ``int16_passes`` when the input is int16. Element-wise ops (add,
concat, requantize, relu, maxpool, upsample) run on the vector unit at 1/16 of the MAC peak
(1/32 with an int16 tensor). int16 tensors also move twice the bytes. Reshape is free; permute
moves its bytes. The frame pays
``frame_overhead`` plus the input (NV12: 1.5 bytes/pixel) and output DMA.
"""

from __future__ import annotations

import html
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from hat_bpu.device.march import March
from hat_bpu.ir import graph as ir
from hat_bpu.ir.ops import op_def

VECTOR_FRACTION = 1 / 16
SPATIAL_FILL = 256
_BYTES = {"int8": 1, "int16": 2, "int32": 4, "float32": 4}


@dataclass
class LayerPerf:
    """One layer's estimate (JSON-able)."""

    name: str
    op: str
    out_shape: list[int]
    ops: int
    weight_bytes: int
    act_bytes: int
    ddr_bytes: int
    utilisation: float
    compute_ms: float
    memory_ms: float
    time_ms: float
    bound: str


def _nbytes(t: ir.Tensor) -> int:
    return int(np.prod(t.shape)) * _BYTES[t.dtype]


def _align(n: int, a: int) -> float:
    return n / (math.ceil(n / a) * a)


def _layer(n: ir.Node, g: ir.Graph, march: March) -> LayerPerf | None:
    t = g.tensors
    out = t[n.outputs[0]]
    ins = [t[i] for i in n.inputs]
    peak = march.peak_tops_int8 * 1e12
    cost = op_def(n.op, n.name).cost
    if cost is None:
        return None  # input/output DMA is charged per frame; reshape is a view
    act = sum(_nbytes(x) for x in ins) + _nbytes(out)
    wbytes = sum(int(p.nbytes) for k, p in n.params.items() if k == "weight")
    ops, unit = cost(n, g)
    if unit == "mac":  # a convolution on the MAC array
        o, i_g = (int(v) for v in n.params["weight"].shape[:2])
        groups = int(n.attrs["groups"])
        util = march.peak_utilisation * _align(i_g, march.mac_align[0]) * _align(
            o // groups if groups > 1 else o, march.mac_align[1])
        if groups > 1:
            util = march.peak_utilisation * march.depthwise_efficiency * _align(
                o, march.mac_align[1]) if i_g == 1 else util
        util *= min(1.0, out.shape[-1] * out.shape[-2] / SPATIAL_FILL)
        wbytes += int(n.params["bias"].nbytes) + 8 * o  # int32 bias + (m, shift) per channel
        if any(x.dtype == "int16" for x in ins):  # int16 input: two passes of the int8 array
            util /= march.int16_passes
    else:
        util = VECTOR_FRACTION / (2 if any(x.dtype == "int16" for x in [*ins, out]) else 1)
    rate = peak * util
    sram = march.sram_kib * 1024
    ddr = wbytes + max(0, act + wbytes - sram)  # the working set beyond SRAM spills to DDR
    compute_s = ops / rate
    memory_s = ddr / (march.ddr_gbps * 1e9)
    time_s = max(compute_s, memory_s) + march.layer_overhead_us * 1e-6
    return LayerPerf(n.name, n.op, list(out.shape), ops, wbytes, act, ddr, round(util, 4),
                     compute_s * 1e3, memory_s * 1e3, time_s * 1e3,
                     "compute" if compute_s >= memory_s else "memory")


def estimate(graph: ir.Graph, march: March) -> dict[str, Any]:
    """The performance estimate of ``graph`` on ``march`` (the ``perf.json`` contents).

    :returns: ``march``, ``input_shape``, ``latency_ms``, ``fps``, ``ops_per_frame``,
        ``ddr_bytes_per_frame``, ``layers`` (list of :class:`LayerPerf` dicts), ``note``.
    """
    layers = [lp for n in graph.nodes if (lp := _layer(n, graph, march)) is not None]
    shape = list(graph.tensors[graph.inputs[0]].shape)
    batch = shape[0] if shape else 1
    in_bytes = int(np.prod(shape)) // max(1, shape[1]) * 3 // 2  # NV12: 1.5 bytes per pixel
    out_bytes = sum(_nbytes(graph.tensors[graph.producer(o).inputs[0]])  # type: ignore[union-attr]
                    for o in graph.outputs)
    io_ms = (in_bytes + out_bytes) / (march.ddr_gbps * 1e9) * 1e3
    latency = (sum(lp.time_ms for lp in layers) + io_ms + march.frame_overhead_us * 1e-3) / batch
    ops = sum(lp.ops for lp in layers) // batch
    ddr = (sum(lp.ddr_bytes for lp in layers) + in_bytes + out_bytes) // batch
    return {"march": march.name, "device": march.device, "input_shape": shape,
            "latency_ms": round(latency, 6), "fps": round(1e3 / latency, 2),
            "ops_per_frame": int(ops), "gops_per_frame": round(ops / 1e9, 3),
            "ddr_bytes_per_frame": int(ddr), "layers": [asdict(lp) for lp in layers],
            "note": "estimates of a modelled device (hat-bpu cost model), not measurements"}


def table(perf: dict[str, Any], top: int | None = None) -> str:
    """A readable per-layer table plus the totals."""
    rows = sorted(perf["layers"], key=lambda r: -r["time_ms"])[:top] if top else perf["layers"]
    lines = [f"{'layer':40s} {'op':10s} {'MOPs':>9s} {'DDR KiB':>9s} {'util':>6s} "
             f"{'ms':>8s}  bound"]
    for r in rows:
        lines.append(f"{r['name'][:40]:40s} {r['op']:10s} {r['ops'] / 1e6:9.2f} "
                     f"{r['ddr_bytes'] / 1024:9.1f} {r['utilisation']:6.3f} {r['time_ms']:8.4f}  "
                     f"{r['bound']}")
    lines.append(f"march {perf['march']} ({perf['device']}), input {perf['input_shape']}: "
                 f"latency {perf['latency_ms']:.3f} ms, {perf['fps']:.1f} FPS, "
                 f"{perf['gops_per_frame']:.2f} GOPs/frame, "
                 f"{perf['ddr_bytes_per_frame'] / 2**20:.2f} MiB DDR/frame")
    lines.append("NOTE: these are estimates of a modelled device, not measurements of a board.")
    return "\n".join(lines)


def block_of(name: str, depth: int = 2) -> str:
    """The block a layer belongs to: the first ``depth`` parts of its dotted module name, with
    a list index kept with its list (``backbone.blocks.3.0.conv`` → ``backbone.blocks.3``)."""
    parts = name.split(".")
    keep = parts[:depth]
    if len(parts) > depth and parts[depth].isdigit():
        keep.append(parts[depth])
    return ".".join(keep)


def frame_costs(perf: dict[str, Any]) -> dict[str, float]:
    """What the per-layer times leave out, per frame: ``overhead_ms`` (the fixed frame overhead
    plus input/output DMA, as :func:`estimate` charges them) and ``layers_ms``."""
    batch = (perf.get("input_shape") or [1])[0] or 1
    layers_ms = sum(r["time_ms"] for r in perf["layers"]) / batch
    return {"layers_ms": layers_ms, "overhead_ms": max(0.0, perf["latency_ms"] - layers_ms)}


def blocks(perf: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-block totals (``block``, ``layers``, ``time_ms``, ``mops``, ``ddr_kib``), slowest first.

    A block is :func:`block_of` a layer's name; a layer named after a bare function
    (``interpolate_1``) or a quantizer-made op (``_hat_q.add_9``) counts in the block of the
    layer before it."""
    out: dict[str, dict[str, Any]] = {}
    current = ""
    for r in perf["layers"]:
        # an op without a module of its own (interpolate_1, _hat_q.add_9) runs inside the block
        # of the layer before it in execution order
        own = "." in r["name"] and not r["name"].startswith("_")
        current = block_of(r["name"]) if own or not current else current
        b = out.setdefault(current, {"block": current, "layers": 0, "time_ms": 0.0,
                                     "mops": 0.0, "ddr_kib": 0.0})
        b["layers"] += 1
        b["time_ms"] += r["time_ms"]
        b["mops"] += r["ops"] / 1e6
        b["ddr_kib"] += r["ddr_bytes"] / 1024
    return sorted(out.values(), key=lambda b: -b["time_ms"])


TOP_LAYERS = 40
"""Layers in the per-layer chart (the slowest); the table lists them all."""


def html_body(perf: dict[str, Any]) -> str:
    """The estimate as HTML (no page around it): totals, the frame overhead, per-block totals
    (chart and table), the slowest layers (chart) and every layer (a sortable table). Used by
    ``perf.html`` and by the run's ``report.html``."""
    from hatcore.report import table
    from hatcore.svg import hbar_chart

    costs = frame_costs(perf)
    lat = perf["latency_ms"]
    head = (f"<p><b>Estimates of a modelled device</b> ({html.escape(str(perf.get('device', '')))}"
            f"), not measurements. March <b>{html.escape(perf['march'])}</b>, input "
            f"{perf['input_shape']}: latency <b>{lat:.3f} ms</b>/frame, {perf['fps']:.1f} FPS, "
            f"{perf['gops_per_frame']:.2f} GOPs/frame, "
            f"{perf['ddr_bytes_per_frame'] / 2**20:.2f} MiB DDR/frame.</p>"
            f"<p>Of the latency, {costs['layers_ms']:.3f} ms ({100 * costs['layers_ms'] / lat:.1f}"
            f" %) is the {len(perf['layers'])} layers and {costs['overhead_ms']:.3f} ms "
            f"({100 * costs['overhead_ms'] / lat:.1f} %) the frame overhead (fixed per-frame cost "
            "and input/output DMA).</p>")
    blk = blocks(perf)
    items = [(b["block"], b["time_ms"], f"{b['layers']} layers, {b['mops']:.1f} MOPs")
             for b in blk] + [("(frame overhead)", costs["overhead_ms"], "fixed + input/output DMA")]
    items.sort(key=lambda t: -t[1])
    colours = ["#7f7f7f" if t[0] == "(frame overhead)" else "#1f77b4" for t in items]
    block_chart = hbar_chart(items, title="time per block (ms), slowest first",
                             xlabel="ms per frame", unit=" ms", colours=colours)
    block_table = table(["block", "layers", "ms", "% of latency", "MOPs", "DDR KiB"],
                        [[b["block"], b["layers"], f"{b['time_ms']:.4f}",
                          f"{100 * b['time_ms'] / lat:.1f}", f"{b['mops']:.2f}",
                          f"{b['ddr_kib']:.1f}"] for b in blk])
    slow = sorted(perf["layers"], key=lambda r: -r["time_ms"])[:TOP_LAYERS]
    layer_chart = hbar_chart(
        [(r["name"], r["time_ms"], f"{r['op']}, {r['bound']}-bound, util {r['utilisation']:.3f}")
         for r in slow], title=f"the {len(slow)} slowest layers (ms; blue: compute-bound, red: "
        "memory-bound)", xlabel="ms per frame", unit=" ms",
        colours=["#d62728" if r["bound"] == "memory" else "#1f77b4" for r in slow])
    layer_table = table(
        ["#", "layer", "op", "output", "MOPs", "DDR KiB", "util", "compute ms", "memory ms", "ms",
         "bound"],
        [[i, r["name"], r["op"], "×".join(map(str, r["out_shape"])), f"{r['ops'] / 1e6:.2f}",
          f"{r['ddr_bytes'] / 1024:.1f}", f"{r['utilisation']:.3f}", f"{r['compute_ms']:.4f}",
          f"{r['memory_ms']:.4f}", f"{r['time_ms']:.4f}", r["bound"]]
         for i, r in enumerate(perf["layers"])], numeric_from=4)
    return (head + "<h3>Per block</h3><div class=row>" + block_chart
            + f"<div class=scroll>{block_table}</div></div><h3>Per layer</h3>" + layer_chart
            + "<details><summary>every layer, in execution order (click a header to sort)"
            f"</summary><div class=scroll>{layer_table}</div></details>")


def to_html(perf: dict[str, Any]) -> str:
    """``perf.html``: a standalone page of :func:`html_body` (the report's styles and script)."""
    from hatcore.report import Section, render

    return render(f"hat perf — {perf['march']} (modelled device)",
                  [Section("perf", "Estimated performance", html_body(perf))])
