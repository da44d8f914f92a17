"""The integer simulator (``int_infer``): executes :class:`hat_bpu.ir.Graph` exactly, fast.

Bit-identical to the literal reference :func:`hat_bpu.ir.reference.run_ir` (tested), with
integer arithmetic only, where float is used only when provably exact:

* int8/int16 activations are held in float32 tensors (integers below 2**24 are exact);
  int32 ones in float64 (exact below 2**53).
* A convolution of an int8 input runs in float32: every partial sum of ``K`` products
  ``|x·w| <= 128·128`` is an integer of magnitude ``<= K·2**14``, exact in float32 while
  ``K·2**14 <= 2**24`` (``K <= 1024``; ``K = I/groups·kh·kw``). Longer reductions are split
  over input channels into chunks of at most 1024 terms and the exact chunk sums added in
  float64. Other inputs (int16) convolve in float64 (exact while ``K·2**22 < 2**53``).
* Requantization ``sat(clip(round_shift(Σ x·m, s)))`` runs in float64 as
  ``round_half_even(Σ x · (m·2**-s))`` when ``Σ |x|·|m| < 2**53`` is guaranteed: then every
  product and the sum are integers times ``2**-s`` with at most 53 significant bits, so float64
  holds them exactly and ``torch.round`` (half to even) is the integer rule. The guarantee is
  static for add/concat/requantize (int8/int16 inputs: ``|x| <= 2**15``, ``m < 2**31``) and
  checked per call for a convolution (``max|acc + bias|`` measured). Otherwise int64 with
  ``round_half_even(v / 2**s) = (v + 2**(s-1) - 1 + ((v >> s) & 1)) >> s`` for ``s > 0``
  (``v`` for ``s = 0``), equal to :func:`hat_bpu.quant.qspec.round_shift`.
* The static bound ``|acc[o]| <= x_max·Σ|w[o]| + |bias[o]|`` (``x_max`` = 128 for int8) also
  lets a convolution run in float32 when ``x_max·Σ|w[o]| <= 2**24`` whatever ``K`` is, and adds
  the bias inside the float32 conv when the whole bound is ``<= 2**24``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from hat_bpu import native
from hat_bpu.ir import graph as ir
from hat_bpu.quant import qspec

EXACT_F32_TERMS = 1024  # K·128·128 <= 2**24
F64_EXACT = 2.0**53
_QMAX_ABS = {"int8": 128, "int16": 32768, "int32": 2**31, "float32": 2**31}
OpFn = Callable[[list[torch.Tensor]], torch.Tensor]


def _storage(dtype: str) -> torch.dtype:
    return torch.float64 if dtype == "int32" else torch.float32


def _rq_consts(m: np.ndarray, s: np.ndarray, shape: tuple[int, ...]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """int64 (m, s, bias = 2**(s-1) - 1 or 0, odd-mask = 1 or 0) reshaped for broadcasting."""
    m = np.asarray(m, np.int64)
    s = np.broadcast_to(np.asarray(s, np.int64), m.shape) if m.size > 1 else np.asarray(s, np.int64)
    bias = np.where(s > 0, np.left_shift(np.int64(1), np.maximum(s - 1, 0)) - 1, 0)
    odd = (s > 0).astype(np.int64)

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(a, np.int64)).reshape(shape)
    return t(m), t(s), t(bias), t(odd)


def round_shift(v: torch.Tensor, s: torch.Tensor, bias: torch.Tensor, odd: torch.Tensor
                ) -> torch.Tensor:
    """``round_half_even(v / 2**s)`` of int64 ``v`` (``bias``/``odd`` from :func:`_rq_consts`)."""
    return torch.bitwise_right_shift(
        v + bias + (torch.bitwise_right_shift(v, s) & odd), s)


def _ratio(m: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``m · 2**-s`` as float64 (exact: ``|m| < 2**31``)."""
    return np.asarray(m, np.float64) * np.exp2(-np.asarray(s, np.float64))


def _bounds(out: ir.Tensor, clip: Any) -> tuple[int, int]:
    """The output's integer range: its dtype's, narrowed by the activation ``clip``."""
    lo, hi = qspec.qrange(out.dtype)
    if clip:
        lo, hi = max(lo, int(clip[0])), min(hi, int(clip[1]))
    return lo, hi


def _finish_f64(v: torch.Tensor, out: ir.Tensor, clip: Any) -> torch.Tensor:
    return v.round_().clamp_(*_bounds(out, clip)).to(_storage(out.dtype))


def _finish(y: torch.Tensor, out: ir.Tensor, clip: Any) -> torch.Tensor:
    return y.clamp_(*_bounds(out, clip)).to(_storage(out.dtype))


class Simulator:
    """A compiled-once executor of one graph: ``Simulator(graph)(x) -> flat float32 outputs``.

    :param graph: the integer graph (e.g. from :func:`hat_bpu.ir.hbir.load_hbir`).
    """

    def __init__(self, graph: ir.Graph) -> None:
        graph.validate()
        self.graph = graph
        self.conv_paths: dict[str, str] = {}  # node name → f32 / f32-chunks / f64 (reports, tests)
        self.steps: list[tuple[list[str], str, OpFn]] = [
            (n.inputs, n.outputs[0], self._build(n)) for n in graph.nodes]
        self._last_use = {t: i for i, (ins, _, _) in enumerate(self.steps) for t in ins}

    def _build(self, n: ir.Node) -> OpFn:
        from hat_bpu.ir.ops import op_def

        return op_def(n.op, n.name).simulate(n, self.graph.tensors, self)

    @torch.no_grad()
    def run(self, x: torch.Tensor, env_out: dict[str, torch.Tensor] | None = None
            ) -> list[torch.Tensor]:
        """Execute on the float input ``x`` (Tensor[N, 3, H, W]); returns flat float32 outputs.

        ``env_out``, when given, keeps every tensor (integers in float storage) by name.
        """
        g = self.graph
        env: dict[str, torch.Tensor] = {} if env_out is None else env_out
        # channels-last: oneDNN's faster layout for the many 1x1 and depthwise convs on CPU;
        # elementwise steps keep it, values are unchanged
        env[g.inputs[0]] = x.detach().cpu().float().contiguous(memory_format=torch.channels_last)
        keep = set(g.outputs) if env_out is None else set(self.graph.tensors)
        for i, (ins, name, fn) in enumerate(self.steps):
            env[name] = fn([env[t] for t in ins])
            if env_out is None:
                for t in ins:
                    if self._last_use.get(t) == i and t not in keep:
                        env.pop(t, None)
        return [env[o] for o in g.outputs]

    def __call__(self, x: torch.Tensor) -> Any:
        """The model's output structure (``graph.meta["output_tree"]``) of float32 tensors."""
        return self.graph.unflatten_outputs(self.run(x))


def _clip(n: ir.Node) -> Any:
    return n.attrs.get("clip")


def sim_quantize(n: ir.Node, t: dict[str, ir.Tensor], sim: Simulator) -> OpFn:
    out = t[n.outputs[0]]
    inv = torch.tensor(np.float32(1.0) / np.float32(out.scale or 1.0))
    lo, hi = qspec.qrange(out.dtype)
    return lambda xs: torch.round(xs[0].float() * inv).clamp_(lo, hi)


def sim_dequantize(n: ir.Node, t: dict[str, ir.Tensor], sim: Simulator) -> OpFn:
    sc = float(t[n.inputs[0]].scale or 1.0)
    return lambda xs: (xs[0].double() * sc).float()


def sim_add(n: ir.Node, t: dict[str, ir.Tensor], sim: Simulator) -> OpFn:
    out, p, in_t = t[n.outputs[0]], n.params, [t[i] for i in n.inputs]
    _, s, b, o = _rq_consts(p["m"][:1], p["shift"][:1], ())
    ms = [int(v) for v in p["m"]]
    bound = sum(_QMAX_ABS[x.dtype] * abs(mi) for x, mi in zip(in_t, ms, strict=True))
    rs = [float(r) for r in _ratio(p["m"], p["shift"][0])]

    lo, hi = _bounds(out, _clip(n))
    per_channel: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def add_native(xs: list[torch.Tensor]) -> torch.Tensor | None:
        """Two float32 inputs alike in layout: ``x0·r0 + x1·r1`` rounded in one pass."""
        if len(xs) != 2 or out.dtype == "int32" or xs[0].dim() != 4 or \
                xs[0].dtype != torch.float32 or xs[1].dtype != torch.float32:
            return None
        c = xs[0].shape[1]
        if c not in per_channel:
            per_channel[c] = (torch.full((c,), rs[0], dtype=torch.float64),
                              torch.full((c,), rs[1], dtype=torch.float64))
        r0, r1 = per_channel[c]
        return native.requant(xs[0], None, r0, lo, hi, xs[1], r1)

    shift = int(p["shift"][0])

    def add_f64(xs: list[torch.Tensor]) -> torch.Tensor:
        y = add_native(xs) if native.available() else None
        if y is None and out.dtype != "int32":  # 3-4 inputs: the exact int64 pass
            y = native.add_int(xs, ms, shift, lo, hi)
        if y is not None:
            return y
        v = xs[0].double() * rs[0]
        for x, r in zip(xs[1:], rs[1:], strict=True):
            v.add_(x.double(), alpha=r)
        return _finish_f64(v, out, _clip(n))
    if bound < F64_EXACT:
        return add_f64

    def add(xs: list[torch.Tensor]) -> torch.Tensor:
        y = native.add_int(xs, ms, shift, lo, hi) if out.dtype != "int32" else None
        if y is not None:
            return y
        v = xs[0].long() * ms[0]
        for x, mi in zip(xs[1:], ms[1:], strict=True):
            v += x.long() * mi
        return _finish(round_shift(v, s, b, o), out, _clip(n))
    return add


def sim_concat(n: ir.Node, t: dict[str, ir.Tensor], sim: Simulator) -> OpFn:
    out, p, a, in_t = t[n.outputs[0]], n.params, n.attrs, [t[i] for i in n.inputs]
    consts = [_rq_consts(p["m"][i:i + 1], p["shift"][i:i + 1], ()) for i in range(len(n.inputs))]
    rs = [float(r) for r in _ratio(p["m"], p["shift"])]
    if all(_QMAX_ABS[x.dtype] * abs(int(mi)) < F64_EXACT for x, mi in zip(in_t, p["m"], strict=True)):
        return lambda xs: torch.cat([_finish_f64(x.double() * r, out, None)
                                     for x, r in zip(xs, rs, strict=True)], a["axis"])

    def concat(xs: list[torch.Tensor]) -> torch.Tensor:
        parts = [_finish(round_shift(x.long() * c[0], c[1], c[2], c[3]), out, None)
                 for x, c in zip(xs, consts, strict=True)]
        return torch.cat(parts, a["axis"])
    return concat


def sim_requantize(n: ir.Node, t: dict[str, ir.Tensor], sim: Simulator) -> OpFn:
    out, p, in_t = t[n.outputs[0]], n.params, t[n.inputs[0]]
    m, s, b, o = _rq_consts(p["m"][:1], p["shift"][:1], ())
    r = float(_ratio(p["m"][:1], p["shift"][:1])[0])
    if _QMAX_ABS[in_t.dtype] * abs(int(p["m"][0])) < F64_EXACT:
        return lambda xs: _finish_f64(xs[0].double() * r, out, _clip(n))
    return lambda xs: _finish(round_shift(xs[0].long() * m, s, b, o), out, _clip(n))


def sim_maxpool(n: ir.Node, t: dict[str, ir.Tensor], sim: Simulator) -> OpFn:
    a = n.attrs
    return lambda xs: F.max_pool2d(xs[0], a["kernel"], a["stride"], a["padding"],
                                   ceil_mode=a["ceil_mode"])


def sim_upsample_nearest(n: ir.Node, t: dict[str, ir.Tensor], sim: Simulator) -> OpFn:
    fh, fw = n.attrs["scale"]

    def up(xs: list[torch.Tensor]) -> torch.Tensor:
        x = xs[0]
        nb, c, h, w = x.shape
        if x.is_contiguous(memory_format=torch.channels_last):  # stay channels-last
            y = x.permute(0, 2, 3, 1)[:, :, None, :, None, :].expand(nb, h, fh, w, fw, c)
            return y.reshape(nb, h * fh, w * fw, c).permute(0, 3, 1, 2)
        return x[:, :, :, None, :, None].expand(nb, c, h, fh, w, fw).reshape(nb, c, h * fh, w * fw)
    return up


def sim_relu(n: ir.Node, t: dict[str, ir.Tensor], sim: Simulator) -> OpFn:
    return lambda xs: xs[0].clamp(min=0)


def sim_reshape(n: ir.Node, t: dict[str, ir.Tensor], sim: Simulator) -> OpFn:
    shape = n.attrs["shape"]
    return lambda xs: xs[0].reshape(xs[0].shape[0], *shape)


def sim_permute(n: ir.Node, t: dict[str, ir.Tensor], sim: Simulator) -> OpFn:
    dims = n.attrs["dims"]
    return lambda xs: xs[0].permute(*dims).contiguous()


def sim_conv2d(n: ir.Node, t: dict[str, ir.Tensor], sim: Simulator) -> OpFn:
    a, p = n.attrs, n.params
    in_t, out = [t[i] for i in n.inputs], t[n.outputs[0]]
    w = p["weight"]
    groups = int(a["groups"])
    k_per_ic = int(w.shape[2] * w.shape[3])
    k = int(w.shape[1]) * k_per_ic
    geo = (tuple(a["stride"]), tuple(a["padding"]), tuple(a["dilation"]))
    int8_in = in_t[0].dtype == "int8"
    w32 = torch.from_numpy(w.astype(np.float32)).contiguous(memory_format=torch.channels_last)
    w64 = torch.from_numpy(w.astype(np.float64)).contiguous(memory_format=torch.channels_last)
    chunks: list[tuple[int, int]] = []
    if int8_in and k > EXACT_F32_TERMS and groups == 1:
        step = max(1, EXACT_F32_TERMS // k_per_ic)
        chunks = [(c, min(c + step, w.shape[1])) for c in range(0, w.shape[1], step)]
    bias = torch.from_numpy(p["bias"].astype(np.int64)).reshape(1, -1, 1, 1)
    # static bounds from the weights: |acc[o]| <= xmax·Σ|w[o]| (+ |bias[o]|), any partial sum too
    x_max = float(_QMAX_ABS[in_t[0].dtype])
    w_sum = np.abs(w.astype(np.float64)).reshape(w.shape[0], -1).sum(1) * x_max
    acc_bound = w_sum + np.abs(p["bias"].astype(np.float64))
    fast32 = in_t[0].dtype in ("int8", "int16") and (
        (int8_in and k <= EXACT_F32_TERMS) or float(w_sum.max()) <= 2**24)
    bias_in_conv = fast32 and float(acc_bound.max()) <= 2**24
    chunks = [] if fast32 else chunks
    sim.conv_paths[n.name] = "f32" if fast32 else "f32-chunks" if chunks else "f64"
    b32 = torch.from_numpy(p["bias"].astype(np.float32)) if bias_in_conv else None
    b64 = bias.double()
    m, s, rb, odd = _rq_consts(p["m"], p["shift"], (1, -1, 1, 1))
    m_abs = float(np.abs(p["m"]).max())
    static_f64 = float((acc_bound * np.abs(p["m"].astype(np.float64))).max())
    r = torch.from_numpy(_ratio(p["m"], p["shift"])).reshape(1, -1, 1, 1)
    m_res = (torch.from_numpy(p["m_res"].astype(np.int64)).reshape(1, -1, 1, 1)
             if "m_res" in p else None)
    res_bound = (_QMAX_ABS[in_t[1].dtype] * float(np.abs(p["m_res"]).max())
                 if m_res is not None else 0.0)
    r_res = (torch.from_numpy(_ratio(p["m_res"], p["shift"])).reshape(1, -1, 1, 1)
             if m_res is not None else None)
    clip = a.get("clip")
    lo, hi = _bounds(out, clip)
    nat = {"bias": None if b32 is not None else b64.reshape(-1), "mult": r.reshape(-1),
           "res_mult": None if r_res is None else r_res.reshape(-1)}

    def native_epilogue(acc: torch.Tensor, res: torch.Tensor | None) -> torch.Tensor | None:
        """The epilogue in one pass (:mod:`hat_bpu.native`) where it is exact in float64 and
        the extension serves the call; else None."""
        if out.dtype == "int32" or (res is not None and res.dtype != torch.float32):
            return None
        if static_f64 + res_bound >= F64_EXACT:
            peak = native.peak_abs(acc, nat["bias"])
            if peak is None or peak * m_abs + res_bound >= F64_EXACT:
                return None
        return native.requant(acc, nat["bias"], nat["mult"], lo, hi, res, nat["res_mult"],
                              out=acc if acc.dtype == torch.float32 else None)  # in place

    def epilogue(acc: torch.Tensor, res: torch.Tensor | None, consts: dict[str, torch.Tensor],
                 buf: torch.Tensor | None = None) -> torch.Tensor:
        """The requantization of ``acc`` (and residual ``res``) to the output's storage;
        ``buf``: a float64 work tensor of ``acc``'s shape (else allocated)."""
        if b32 is None:  # the bias, promoting to float64 in the same pass (exact)
            acc = torch.add(acc, consts["b64"], out=buf)
        exact = static_f64 + res_bound < F64_EXACT
        if not exact:  # the weight bound is too loose: measure these accumulators
            lo, hi = torch.aminmax(acc)
            exact = max(-float(lo), float(hi)) * m_abs + res_bound < F64_EXACT
        if exact:  # every product and sum below is exact in float64
            v = acc.mul_(consts["r"]) if acc.dtype == torch.float64 else \
                torch.mul(acc, consts["r"], out=buf)
            if res is not None:
                v.addcmul_(res.double(), consts["r_res"])
            return _finish_f64(v, out, clip)
        v = acc.long() * consts["m"]
        if res is not None:
            v += res.long() * consts["m_res"]
        return _finish(round_shift(v, consts["s"], consts["rb"], consts["odd"]), out, clip)

    full = {"b64": b64, "r": r, "r_res": r_res, "m": m, "m_res": m_res, "s": s, "rb": rb,
            "odd": odd}
    rows = {k: None if v is None else v.reshape(-1) for k, v in full.items()}  # per NHWC row

    def conv(xs: list[torch.Tensor]) -> torch.Tensor:
        x = xs[0]
        if fast32:
            acc = F.conv2d(x.float(), w32, b32, *geo, groups)
        elif chunks:
            acc = sum(F.conv2d(x[:, c0:c1].float(), w32[:, c0:c1], None, *geo, 1).double()
                      for c0, c1 in chunks)
        else:
            acc = F.conv2d(x.double(), w64, None, *geo, groups)
        assert isinstance(acc, torch.Tensor)
        res = xs[1] if m_res is not None else None
        y = native_epilogue(acc, res) if native.available() else None
        if y is not None:
            return y
        if acc.numel() > SLICE_ABOVE:
            sliced = _by_rows(acc, res, lambda a, rr, buf: epilogue(a, rr, rows, buf),
                              _storage(out.dtype))
            if sliced is not None:
                return sliced
        return epilogue(acc, res, full)
    return conv


EPILOGUE_SLICE = 1 << 18
"""Elements of a conv's float64 epilogue done at a time (~2 MiB) on outputs above
:data:`SLICE_ABOVE`. Elementwise, so the values are the same either way."""
SLICE_ABOVE = 1 << 22
"""Outputs above this many elements take their float64 epilogue in slices: whole, each of its
float64 temporaries (32 MiB and more) is above glibc's largest mmap threshold, so it is mapped
afresh on every call (page faults) and streamed through memory; the slices reuse one buffer
that stays in cache. Below it, whole is faster (fewer calls; bench/RESULTS.md)."""


def _by_rows(acc: torch.Tensor, res: torch.Tensor | None,
             fn: Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor],
             dtype: torch.dtype) -> torch.Tensor | None:
    """``fn`` applied to slices of whole NHWC pixels of a channels-last ``acc`` (and ``res``),
    written into one output of ``dtype``; None when the layouts do not allow it."""
    if acc.dim() != 4 or not acc.is_contiguous(memory_format=torch.channels_last) or (
            res is not None and (res.shape != acc.shape or
                                 not res.is_contiguous(memory_format=torch.channels_last))):
        return None
    n, c, h, w = acc.shape
    out = torch.empty(acc.shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
    a2, o2 = acc.permute(0, 2, 3, 1).view(-1, c), out.permute(0, 2, 3, 1).view(-1, c)
    r2 = None if res is None else res.permute(0, 2, 3, 1).view(-1, c)
    step = max(1, EPILOGUE_SLICE // c)
    buf = torch.empty(min(step, a2.shape[0]), c, dtype=torch.float64)
    for i in range(0, a2.shape[0], step):
        j = min(i + step, a2.shape[0])
        o2[i:j] = fn(a2[i:j], None if r2 is None else r2[i:j], buf[:j - i])
    return out
