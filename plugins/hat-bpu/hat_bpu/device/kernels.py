"""The runtime's integer kernels: one builder per instruction head and per epilogue stage.

Written from the documented semantics (docs/formats.md, ``hat_bpu/device/program.py``), not
from the simulator: no code is shared with :mod:`hat_bpu.ir.simulator` or
:mod:`hat_bpu.quant.intmath`. Values are integers held in torch tensors; where a float type
holds them the compiler has proved it exact (``arith``):

* conv ``f32``: ``x_max·Σ|w[o]| + |bias[o]| <= 2**24`` bounds every partial sum, so any
  summation order gives the exact integer; ``f64``: the same bound ``< 2**53``. Float64
  convolutions have no fast CPU kernel, so an ``f64`` spatial conv runs as exact float32 convs
  when it can: the bias (often what breaks the 2**24 bound) is added afterwards in float64, and
  when ``x_max·Σ|w[o]| > 2**24`` an int16 input is split ``x = 256·hi + lo`` (``hi = x >> 8`` in
  [-128, 127], ``lo = x & 255`` in [0, 255]) when ``255·Σ|w[o]| <= 2**24``: each conv is then an
  exact integer in float32 and ``256·conv(hi) + conv(lo) + bias`` in float64 (every term below
  2**53) is the exact result. 1x1 convs are float64 matmuls (BLAS is fast there).
* requant ``f64``: ``v = Σ term·m`` with ``Σ|term|·|m| < 2**53``: every product and partial sum
  is an integer below 2**53 (exact), scaling by ``2**-shift`` is exact, and ``torch.round``
  rounds half to even - the integer rule ``round_shift``. ``i64``: ``v`` in int64 and
  :func:`round_shift_i64`.

Every head writes the whole stored tensor, pad channels included (zeros), so a reused buffer
never leaks old values.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.nn import functional as F

from hat_bpu.device.program import QRANGE, Instr, Stage, TensorInfo

Step = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def round_shift_i64(v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``round_half_even(v / 2**s)`` of int64 ``v`` for ``s >= 0`` (broadcast), in place on
    ``v``: ``(v + 2**(s-1) - 1 + odd) >> s`` with ``odd = (v >> s) & 1``, the floor quotient's
    parity, for ``s > 0`` (a remainder below half stays, above half carries, exactly half
    carries only an odd quotient); ``v`` itself for ``s == 0``. Exact while
    ``|v| + 2**s < 2**63``."""
    on = (s > 0).to(torch.int64)
    bias = ((torch.ones_like(s) << s) >> 1) - on
    odd = (v >> s).bitwise_and_(on)
    return v.add_(odd).add_(bias).bitwise_right_shift_(s)


def _channels(a: np.ndarray, ndim: int) -> torch.Tensor:
    """A per-channel (length > 1) or scalar parameter shaped to broadcast over ``ndim`` dims."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if t.numel() > 1:
        return t.reshape(1, -1, *([1] * (ndim - 2)))
    return t.reshape([1] * ndim)  # dimensioned: it takes part in type promotion


def logical(x: torch.Tensor, info: TensorInfo) -> torch.Tensor:
    """The logical tensor inside a stored one (pad channels cut)."""
    if len(info.stored) == 4 and info.stored[1] != info.shape[1]:
        return x[:, :info.shape[1]]
    return x


def padded(y: torch.Tensor, info: TensorInfo) -> torch.Tensor:
    """A logical tensor in its stored layout (zero pad channels)."""
    if len(info.stored) == 4 and y.shape[1] != info.stored[1]:
        return F.pad(y, (0, 0, 0, 0, 0, info.stored[1] - y.shape[1]))
    return y


def requant_stage(st: Stage, ndim: int) -> Callable[[torch.Tensor, list[torch.Tensor]],
                                                     torch.Tensor]:
    """``reg, inputs -> sat(clip(round_shift(Σ term·m, shift)))`` (f64 or i64, see above)."""
    lo, hi = st.bounds()
    if st.arith == "f64":
        shift = np.asarray(st.shift, np.float64)
        ratios = [_channels(np.asarray(m, np.float64) * np.exp2(-shift), ndim) for m in st.m]

        def f64(reg: torch.Tensor, xs: list[torch.Tensor]) -> torch.Tensor:
            v = None
            for k, r in zip(st.terms, ratios, strict=True):
                term = reg if k < 0 else xs[k]  # promoted to float64 by the product (exact)
                v = term * r if v is None else v.add_(term * r)
            assert v is not None
            return v.round_().clamp_(lo, hi)
        return f64
    ms = [_channels(np.asarray(m, np.int64), ndim) for m in st.m]
    s = _channels(np.asarray(st.shift, np.int64), ndim)

    def i64(reg: torch.Tensor, xs: list[torch.Tensor]) -> torch.Tensor:
        v = None
        for k, m in zip(st.terms, ms, strict=True):
            term = (reg if k < 0 else xs[k]).to(torch.int64)
            v = term * m if v is None else v.add_(term * m)
        assert v is not None
        return round_shift_i64(v, s).clamp_(lo, hi)
    return i64


def _pool_size(n: int, k: int, s: int, p: int, ceil: bool) -> int:
    """Output length of a max-pool (torch's rule: with ``ceil_mode`` the last window must start
    inside the input or its left padding)."""
    span = n + 2 * p - k
    out = (-(-span // s) if ceil else span // s) + 1
    if ceil and (out - 1) * s >= n + p:
        out -= 1
    return out


def maxpool(x: torch.Tensor, kernel: list[int], stride: list[int], padding: list[int],
            ceil: bool) -> torch.Tensor:
    """Window maximum with -inf padding, from strided windows (float32 holds int16 exactly)."""
    xf = x.to(torch.float32)
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    oh = _pool_size(x.shape[2], kh, sh, ph, ceil)
    ow = _pool_size(x.shape[3], kw, sw, pw, ceil)
    extra_h = max(0, (oh - 1) * sh + kh - (x.shape[2] + 2 * ph))
    extra_w = max(0, (ow - 1) * sw + kw - (x.shape[3] + 2 * pw))
    xf = F.pad(xf, (pw, pw + extra_w, ph, ph + extra_h), value=float("-inf"))
    win = xf.unfold(2, kh, sh).unfold(3, kw, sw)[:, :, :oh, :ow]
    return win.amax(dim=(-2, -1))


def build(ins: Instr, tensors: dict[str, TensorInfo]) -> Step:
    """The callable of one instruction: ``env (tensor name → stored tensor) -> register`` (the
    stored output's integer values, in whatever exact dtype the last step left them)."""
    head = _head(ins, tensors)
    ndim = len(tensors[ins.output].stored)
    stages = [requant_stage(st, ndim) if st.op == "requant" else None for st in ins.stages]

    def step(env: dict[str, torch.Tensor]) -> torch.Tensor:
        xs = [env[t] for t in ins.inputs]
        reg = head(xs)
        for fn in stages:
            reg = fn(reg, xs) if fn is not None else reg.clamp(min=0)
        return reg
    return step


def _head(ins: Instr, tensors: dict[str, TensorInfo]) -> Callable[[list[torch.Tensor]],
                                                                   torch.Tensor]:
    a, out = ins.attrs, tensors[ins.output]
    src = tensors[ins.inputs[0]]
    if ins.op == "load":
        return lambda xs: xs[0]
    if ins.op == "quantize":
        inv = np.float32(1.0) / np.float32(a["scale"])
        lo, hi = QRANGE[a["dtype"]]  # the head's own type: a fused requantize may follow
        return lambda xs: padded(torch.round(xs[0].to(torch.float32) * float(inv))
                                 .clamp_(lo, hi), out)
    if ins.op == "conv2d":
        return _conv(ins, src)
    if ins.op == "maxpool":
        return lambda xs: maxpool(xs[0], a["kernel"], a["stride"], a["padding"],
                                  bool(a["ceil_mode"]))
    if ins.op == "upsample_nearest":
        fh, fw = (int(v) for v in a["scale"])
        return lambda xs: xs[0].repeat_interleave(fh, dim=2).repeat_interleave(fw, dim=3)
    if ins.op == "reshape":
        shape = [int(v) for v in a["shape"]]
        return lambda xs: padded(logical(xs[0], src).reshape(1, *shape), out)
    if ins.op == "permute":
        dims = [int(v) for v in a["dims"]]
        return lambda xs: padded(logical(xs[0], src).permute(*dims), out)
    if ins.op == "concat":
        return _concat(ins, tensors)
    raise ValueError(f"instruction {ins.name!r}: unknown head {ins.op!r}")


def _conv(ins: Instr, src: TensorInfo) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    a = ins.attrs
    ftype = torch.float32 if ins.arith == "f32" else torch.float64
    w = torch.from_numpy(np.ascontiguousarray(ins.params["weight"])).to(ftype).contiguous(
        memory_format=torch.channels_last)  # oneDNN's fast path on the NHWC activations
    b = torch.from_numpy(np.ascontiguousarray(ins.params["bias"])).to(ftype)
    geo = ([int(v) for v in a["stride"]], [int(v) for v in a["padding"]],
           [int(v) for v in a["dilation"]])
    layout = a["layout"]
    if layout == "dense" and w.shape[2:] == (1, 1) and geo[1] == [0, 0]:
        # a 1x1 conv is a matmul over the NHWC pixels: [H·W, C] @ [C, O]
        sh, sw = geo[0]
        wt = w.reshape(w.shape[0], -1).t().contiguous()

        # float64 proved but the products alone fit float32: an exact float32 matmul, then
        # the bias in float64 (module docstring)
        mm32 = ftype == torch.float64 and _products_fit_f32(w, src.dtype)
        wt32 = wt.to(torch.float32)

        def pointwise(xs: list[torch.Tensor]) -> torch.Tensor:
            x = xs[0][:, :, ::sh, ::sw].permute(0, 2, 3, 1)  # [1, H, W, C]
            pixels = x.reshape(-1, x.shape[-1])
            y = (pixels.to(torch.float32) @ wt32).to(torch.float64).add_(b) if mm32 \
                else torch.addmm(b, pixels.to(ftype), wt)
            return y.reshape(*x.shape[:3], -1).permute(0, 3, 1, 2)
        return pointwise
    if layout in ("dense", "depthwise"):
        groups = 1 if layout == "dense" else w.shape[0]
        if ftype == torch.float64:
            split = _split_conv(w, b, geo, groups, src.dtype)
            if split is not None:
                return split
        return lambda xs: F.conv2d(xs[0].to(ftype), w, b, *geo, groups)
    groups = int(a["groups"])
    n_out = b.shape[0]
    wl, bl = w, b
    return lambda xs: F.pad(F.conv2d(logical(xs[0], src).to(ftype), wl, bl[:wl.shape[0]], *geo,
                                     groups), (0, 0, 0, 0, 0, n_out - wl.shape[0]))


def _row_sum(w: torch.Tensor) -> float:
    """``max_o Σ|w[o]|``: the largest output channel's weight magnitude."""
    return float(w.abs().flatten(1).sum(1).max())


def _products_fit_f32(w: torch.Tensor, dtype: str) -> bool:
    """Every partial sum of ``x·w`` (bias apart) is an exact float32 integer for ``dtype``
    activations: ``x_max·Σ|w[o]| <= 2**24``."""
    return -QRANGE[dtype][0] * _row_sum(w) <= 2.0**24


def _split_conv(w: torch.Tensor, b: torch.Tensor, geo: tuple[list[int], list[int], list[int]],
                groups: int, dtype: str) -> Callable[[list[torch.Tensor]], torch.Tensor] | None:
    """An exact float64 conv as one or two exact float32 convs (module docstring); None when
    the weights are too large for either."""
    w32 = w.to(torch.float32).contiguous(memory_format=torch.channels_last)
    b64 = b.reshape(1, -1, 1, 1)
    if _products_fit_f32(w, dtype):
        return lambda xs: F.conv2d(xs[0].to(torch.float32), w32, None, *geo, groups) \
            .to(torch.float64).add_(b64)
    if dtype != "int16" or 255 * _row_sum(w) > 2.0**24:
        return None

    def split(xs: list[torch.Tensor]) -> torch.Tensor:
        x = xs[0]
        hi = F.conv2d(torch.bitwise_right_shift(x, 8).to(torch.float32), w32, None, *geo, groups)
        lo = F.conv2d(torch.bitwise_and(x, 255).to(torch.float32), w32, None, *geo, groups)
        return hi.to(torch.float64).mul_(256).add_(lo.to(torch.float64)).add_(b64)
    return split


def _concat(ins: Instr, tensors: dict[str, TensorInfo]) -> Callable[[list[torch.Tensor]],
                                                                     torch.Tensor]:
    out = tensors[ins.output]
    axis = int(ins.attrs["axis"])
    dtype = ins.attrs["dtype"]  # the concat's own type: a fused requantize may follow
    lo, hi = QRANGE[dtype]
    srcs = [tensors[t] for t in ins.inputs]
    parts = []
    for i, arith in enumerate(ins.attrs["arith"]):
        st = Stage("requant", ins.name, "concat", [0], [ins.params["m"][i:i + 1]],
                   ins.params["shift"][i:i + 1], dtype, [lo, hi], arith)
        parts.append(requant_stage(st, len(out.stored)))
    on_channels = len(out.stored) == 4 and axis == 1

    def concat(xs: list[torch.Tensor]) -> torch.Tensor:
        ys = [fn(x, [x]).to(torch.float64)
              for fn, x in zip(parts, [logical(x, s) if on_channels else x
                                       for x, s in zip(xs, srcs, strict=True)], strict=True)]
        y = torch.cat(ys, axis)
        return padded(y, out) if on_channels else y
    return concat
