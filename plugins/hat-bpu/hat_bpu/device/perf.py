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
            "latency_ms": round(latency, 4), "fps": round(1e3 / latency, 2),
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


def to_html(perf: dict[str, Any]) -> str:
    """A standalone HTML page: totals and an inline SVG bar chart of time per layer."""
    layers = perf["layers"]
    tmax = max((r["time_ms"] for r in layers), default=1.0) or 1.0
    bar_h, width, label_w = 14, 520, 300
    bars = []
    for i, r in enumerate(layers):
        w = r["time_ms"] / tmax * width
        color = "#d9534f" if r["bound"] == "memory" else "#337ab7"
        y = i * (bar_h + 2)
        bars.append(f'<text x="{label_w - 4}" y="{y + 11}" text-anchor="end" font-size="10">'
                    f'{html.escape(r["name"][:48])}</text><rect x="{label_w}" y="{y}" '
                    f'width="{w:.1f}" height="{bar_h}" fill="{color}"><title>'
                    f'{html.escape(r["op"])} {r["time_ms"]:.4f} ms ({r["bound"]})</title></rect>')
    h = len(layers) * (bar_h + 2)
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + width + 20}" '
           f'height="{h}">{"".join(bars)}</svg>')
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>hat perf "
            f"{html.escape(perf['march'])}</title></head><body><h1>Estimated performance: "
            f"{html.escape(perf['march'])}</h1><p><b>Estimates of a modelled device</b>, not "
            f"measurements. Input {perf['input_shape']}: latency {perf['latency_ms']:.3f} ms, "
            f"{perf['fps']:.1f} FPS, {perf['gops_per_frame']:.2f} GOPs/frame, "
            f"{perf['ddr_bytes_per_frame'] / 2**20:.2f} MiB DDR/frame.</p>"
            f"<p>Per-layer time (blue: compute-bound, red: memory-bound)</p>{svg}</body></html>")
