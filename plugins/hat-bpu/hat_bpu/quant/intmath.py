"""Integer forms of the fake-quant ops — what fake quant computes, in training and in eval.

``conv_params`` turns a fused conv's float state into the integers of :mod:`hat_bpu.ir.graph`
(int8 weights, int32 bias, multipliers and shifts); :func:`int_conv`, :func:`int_sum`,
:func:`int_requant` run those same integers with torch, differentiably (straight-through
rounding): the accumulator as an integer (float32 where exact, else float64), then the device's
requantization ``round_shift(acc·m, s)`` as ``round_half_even(acc·(m/2**s))`` in float64 (see
:func:`_finish` for why that equals the integer rule). So QAT trains against the arithmetic
the integer model runs; ``exact_eval`` only adds float64 accumulation where float32 could round.

Eval under ``torch.no_grad()`` takes fast paths with the same values bit for bit: no autograd
wrappers, in-place epilogues, conv integers prepared once (:class:`ConvInts`, cached by
:class:`hat_bpu.quant.fake_quant.QConv2d`), and exact int8 accumulation in float32 chunks of at
most :data:`F32_CHUNK` terms instead of float64. Training (gradients on) takes fused fast
paths with the same values and gradients bit for bit (:func:`fast_train_paths`:
:func:`int_conv_train`, :class:`_IntSum`).
:func:`plain_paths` turns both off (tests, ``bench/bpu_fq_speed.py`` and ``bench/bpu_quant.py
--interleave`` compare them; ``HAT_BPU_PLAIN_FQ=1`` does it for a whole process);
:func:`compile_epilogue` (opt-in) fuses the conv epilogue with ``torch.compile``.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.nn import functional as F

from hat_bpu import native
from hat_bpu.quant import qspec

F32_CHUNK = 1024
"""Most terms of an int8 × int8 dot product summed in float32: ``1024 · 128 · 128 = 2**24``,
so every partial sum is an integer float32 holds exactly."""

_plain = [os.environ.get("HAT_BPU_PLAIN_FQ", "") not in ("", "0")]


@contextlib.contextmanager
def plain_paths(plain: bool = True) -> Iterator[None]:
    """Within the block, fake quant runs its plain paths (every conv's integers recomputed,
    float64 accumulation where float32 could round, autograd wrappers) even in no-grad eval;
    ``plain_paths(False)`` forces the fast ones. Values are the same either way."""
    old = _plain[0]
    _plain[0] = plain
    try:
        yield
    finally:
        _plain[0] = old


def fast_paths() -> bool:
    """True when this call may take the no-grad fast paths: not inside :func:`plain_paths`
    and gradients off (``torch.no_grad()`` / ``inference_mode``)."""
    return not _plain[0] and not torch.is_grad_enabled()


def fast_train_paths() -> bool:
    """True when training (gradients on) may take the QAT fast paths: fused autograd functions
    that compute the plain paths' values and gradients bit for bit with fewer temporaries;
    off inside :func:`plain_paths` (and with ``HAT_BPU_PLAIN_FQ=1``)."""
    return not _plain[0]


def dense_view(x: torch.Tensor) -> torch.Tensor:
    """``x`` viewed in its memory order (a channels-last NCHW tensor as NHWC), for reductions
    whose value does not depend on the order (max, min): torch reduces a channels-last tensor
    several times slower than a contiguous one."""
    if (x.dim() == 4 and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last)):
        return x.permute(0, 2, 3, 1)
    return x


class _WeightFakeQuant(torch.autograd.Function):
    """Per-output-channel ``clamp(round(w·(1/s[o])), qmin, qmax)·s[o]`` with a straight-through
    gradient inside the range: the values of ``torch.fake_quantize_per_channel_affine``, in a
    few elementwise kernels (torch's CPU kernel costs ~0.2 ms even on a small weight)."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int
                ) -> torch.Tensor:
        shape = (-1,) + (1,) * (w.dim() - 1)
        inv = (1.0 / scale.float()).reshape(shape)
        r = torch.round(w * inv)
        q = r.clamp(qmin, qmax)
        ctx.save_for_backward(r.eq_(q))
        return q.mul_(scale.reshape(shape))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None


def fake_quant_weight(w: torch.Tensor, dtype: str, pow2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric fake quant of ``w`` (Tensor[O, ...]); returns (w_fq, scale[O])."""
    amax = w.detach().abs().flatten(1).amax(1)
    scale = qspec.scale_from_amax(amax, dtype, pow2)
    qmin, qmax = qspec.qrange(dtype)
    return _WeightFakeQuant.apply(w, scale, qmin, qmax), scale


def conv_params(w: torch.Tensor, b: torch.Tensor, pow2: bool, s_in: float, s_out: float,
                s_res: float | None) -> dict[str, np.ndarray]:
    """int8 weight, int32 bias, ``m``/``shift`` (and ``m_res``) of a fused conv (ir ``conv2d``).

    :param w: the BN-folded float weight Tensor[O, I/g, kh, kw]; ``b`` its folded bias Tensor[O].
    """
    with torch.no_grad():
        w, b = w.detach().float().cpu(), b.detach().float().cpu()
        wi, w_scale = int_weight(w, pow2, b, s_in)
        wq = wi.to(torch.int8)
    bq = qspec.quantize_bias(b.numpy(), s_in, w_scale.numpy())
    ratio = (np.float32(s_in) * w_scale.numpy()).astype(np.float64) / s_out
    params = {"weight": wq.numpy(), "bias": bq.astype(np.int32),
              "w_scale": w_scale.double().numpy()}
    if s_res is None:
        m, s = qspec.requant_params(ratio)
        params.update(m=m, shift=s)
    else:
        (m, m_res), s = qspec.shared_requant_params([ratio, np.full_like(ratio, s_res / s_out)])
        params.update(m=m, shift=s, m_res=m_res)
    return params


class _RoundSTE(torch.autograd.Function):
    """``round_half_even(x)`` forward, identity gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


class _ClampRoundSTE(torch.autograd.Function):
    """``clamp(round_half_even(v), lo, hi)`` forward; gradient 1 where ``round(v)`` is inside
    ``[lo, hi]``, 0 outside (the mask of ``torch.fake_quantize_per_tensor_affine``)."""

    @staticmethod
    def forward(ctx: Any, v: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        r = torch.round(v)
        q = r.clamp(lo, hi)
        ctx.save_for_backward(r == q)
        return q

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """Round half to even with a straight-through gradient."""
    return _RoundSTE.apply(x)


def to_int(x: torch.Tensor, scale: float) -> torch.Tensor:
    """The integers of a fake-quantized tensor as float64: ``round(x / scale)`` (STE gradient)."""
    if fast_paths():
        return (x.double() / scale).round_()
    return ste_round(x.double() / scale)


def to_float(q: torch.Tensor, scale: float) -> torch.Tensor:
    """Dequantize as the integer model does: ``float32(q) · float32(scale)``."""
    return q.float() * torch.tensor(scale, dtype=torch.float32, device=q.device)


def _t(a: np.ndarray, like: torch.Tensor, shape: tuple[int, ...] = (1, -1, 1, 1)) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(like.device).reshape(shape)


def _mult(m: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``m / 2**s`` as float64 (exact: m < 2**31)."""
    return np.asarray(m, np.float64) / np.exp2(np.asarray(s, np.float64))


def _finish(v: torch.Tensor, dtype: str, clip: tuple[int, int] | None, s_out: float
            ) -> torch.Tensor:
    """``sat(clip(round_half_even(v)))`` of float64 ``v = Σ x·m / 2**s``, dequantized to float32
    (gradient straight through inside the range).

    Equal to the int64 ``round_shift`` (qspec) unless a value lies within ~2**-46 of a rounding
    tie without being one (exact ties are representable, so they round the same): ~1e-13.
    """
    lo, hi = _bounds(dtype, clip)
    if fast_paths():  # v is always a temporary of the caller's: round and clamp it in place
        return to_float(v.round_().clamp_(lo, hi), s_out)
    return to_float(_ClampRoundSTE.apply(v, lo, hi), s_out)


def _bounds(dtype: str, clip: tuple[int, int] | None) -> tuple[int, int]:
    lo, hi = qspec.qrange(dtype)
    if clip is not None:
        lo, hi = max(lo, clip[0]), min(hi, clip[1])
    return lo, hi


def int_weight(w: torch.Tensor, pow2: bool, b: torch.Tensor | None = None,
               s_in: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 weight as float (STE gradient ``1/s_w``) and its per-channel scale ``s_w[O]``
    (:func:`qspec.weight_scale`: raised where the bias would saturate): the integers
    :func:`conv_params` stores."""
    scale = qspec.weight_scale(w, b, s_in, pow2)
    inv = (1.0 / scale.float()).reshape(-1, *([1] * (w.dim() - 1)))
    return _ClampRoundSTE.apply(w * inv, -128, 127), scale


def int_conv(x: torch.Tensor, res: torch.Tensor | None, w: torch.Tensor, b: torch.Tensor,
             conv: Any, s_in: float, s_res: float | None, out_fq: Any, clip_of: Any, pow2: bool,
             in_dtype: str = "int8", exact: bool = False, act: str = "none") -> torch.Tensor:
    """ir ``conv2d`` on fake-quantized float inputs, differentiable: the fake-quant output.

    The integers are those of :func:`conv_params` (int8 weight, int32 bias, ``m / 2**s``); the
    accumulation runs in float32 (exact for an int8 input while ``K·128·127 < 2**24``), or in
    float64 when ``exact`` or for an int16 input. The requantization is the device's
    ``round(acc·m / 2**s)`` in float64. Gradients are straight through (``w`` and ``x`` get the
    gradient of ``conv(x, w_fq)``). ``out_fq`` (the output quantizer) may update its QAT range
    from the float pre-activation first; ``clip_of(s_out)`` gives the activation's integer clip.
    """
    wi, w_scale = int_weight(w, pow2, b, s_in)
    k = int(np.prod(w.shape[1:]))
    f64 = in_dtype != "int8" or (exact and k * 128 * 127 >= 2**24)
    ftype = torch.float64 if f64 else torch.float32
    xi = ste_round(x.to(ftype) / s_in)
    acc = F.conv2d(xi, wi.to(ftype), None, conv.stride, conv.padding, conv.dilation,
                   conv.groups).double()
    acc_scale = torch.tensor(s_in, dtype=torch.float32, device=w.device) * w_scale.float()
    bi = ste_round(b.float() / acc_scale).clamp(*qspec.QRANGE["int32"]).double()
    acc = acc + bi.reshape(1, -1, 1, 1)
    ri = to_int(res, s_res) if res is not None and s_res is not None else None
    if out_fq.tracks():  # QAT: the output range follows the float pre-activation
        y = acc.detach() * (acc_scale.double().reshape(1, -1, 1, 1))
        out_fq.track(y if ri is None else y + ri.detach() * s_res, act)
    s_out = float(out_fq.scale)
    mult, mult_res = _conv_mults(s_in, w_scale, s_out, s_res if ri is not None else None, acc)
    v = acc * mult if ri is None else acc * mult + ri * mult_res
    return _finish(v, out_fq.dtype, clip_of(s_out), s_out)


def int_conv_train(x: torch.Tensor, res: torch.Tensor | None, w: torch.Tensor, b: torch.Tensor,
                   conv: Any, s_in: float, s_res: float | None, out_fq: Any, clip_of: Any,
                   pow2: bool, in_dtype: str = "int8", exact: bool = False, act: str = "none"
                   ) -> torch.Tensor:
    """:func:`int_conv` with gradients, fused (:func:`fast_train_paths`): the same weight and
    bias integers and conv; the input's ``round(x / s_in)`` in one autograd function
    (:class:`_DivRoundSTE`), the float64 epilogue and its backward in another
    (:class:`_ConvEpilogue`) that keeps one mask instead of the plain path's chain of
    float64 temporaries, sharing the accumulator with the QAT range update. Values and
    gradients equal :func:`int_conv`'s."""
    wi, w_scale = int_weight(w, pow2, b, s_in)
    k = int(np.prod(w.shape[1:]))
    f64 = in_dtype != "int8" or (exact and k * 128 * 127 >= 2**24)
    ftype = torch.float64 if f64 else torch.float32
    xi = _DivRoundSTE.apply(x.to(ftype), s_in)
    acc = F.conv2d(xi, wi.to(ftype), None, conv.stride, conv.padding, conv.dilation,
                   conv.groups)
    acc_scale = torch.tensor(s_in, dtype=torch.float32, device=w.device) * w_scale.float()
    bi = ste_round(b.float() / acc_scale).clamp(*qspec.QRANGE["int32"]).double()
    bi = bi.reshape(1, -1, 1, 1)
    has_res = res is not None and s_res is not None
    a = ri = None  # acc + b and the residual's integers, when the range update forms them
    with torch.no_grad():
        if out_fq.tracks():  # QAT: the output range follows the float pre-activation
            peak = native.peak(acc.detach(), bi, acc_scale.double(),
                               res.detach() if has_res and res is not None else None, s_res,
                               s_res)
            if peak is not None:  # its min and max in one pass (the same values)
                out_fq.track_range(peak[0], peak[1], act)
            else:
                a, ri = _epilogue_terms(acc, bi, res if has_res else None, s_res)
                y = a * acc_scale.double().reshape(1, -1, 1, 1)
                out_fq.track(y if ri is None or s_res is None else y.add_(ri * s_res), act)
                del y
    s_out = float(out_fq.scale)
    mult, mult_res = _conv_mults(s_in, w_scale, s_out, s_res if has_res else None, bi, True)
    lo, hi = _bounds(out_fq.dtype, clip_of(s_out))
    t_out = torch.tensor(s_out, dtype=torch.float32, device=acc.device)
    return _ConvEpilogue.apply(acc, bi, a, mult, res if has_res else None, ri, s_res, mult_res,
                               lo, hi, t_out)  # (a None: the built pass forms the terms)


def _epilogue_terms(acc: torch.Tensor, bi: torch.Tensor, res: torch.Tensor | None,
                    s_res: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``float64(acc) + b`` and the residual's integers ``round(float64(res) / s_res)`` (None
    without a residual), new tensors, no gradient."""
    with torch.no_grad():
        a = acc.detach().to(torch.float64, copy=True).add_(bi)
        ri = None
        if res is not None and s_res is not None:
            ri = res.detach().to(torch.float64, copy=True).div_(s_res).round_()
    return a, ri


class _DivRoundSTE(torch.autograd.Function):
    """``round_half_even(x / s)``, gradient ``grad / s``: :func:`ste_round` of ``x / s``, one
    tensor and one autograd node less (float32: one built pass, the same values)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, s: float) -> torch.Tensor:
        ctx.s = s
        done = native.quantize(x, s) if x.dtype == torch.float32 else None
        return done if done is not None else (x / s).round_()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad / ctx.s, None


class _ConvEpilogue(torch.autograd.Function):
    """``float32(clamp(round((float64(acc) + b)·m [+ round(float64(r)/s_r)·m_r]), lo, hi))·s_out``
    with the gradients autograd gives :func:`int_conv`'s op chain (straight through the
    roundings, zero outside ``[lo, hi]``), op by op in the same order, in place where the
    plain path allocates (the mask as float64 ``1.0/0.0``: ``grad · mask`` is the same
    product as ``grad · bool``, without a mixed-dtype multiply). ``a`` (``float64(acc) + b``)
    and ``ri`` (the residual's integers) come precomputed, as temporaries it may overwrite, or
    None: then the built pass (:func:`hat_bpu.native.requant_train`) computes the same values
    and a one-byte mask in one pass, and :func:`hat_bpu.native.requant_train_grad` the
    backward, where they serve (else the torch ops here)."""

    @staticmethod
    def forward(ctx: Any, acc: torch.Tensor, bi: torch.Tensor, a: torch.Tensor | None,
                mult: torch.Tensor, res: torch.Tensor | None, ri: torch.Tensor | None,
                s_res: float | None, mult_res: torch.Tensor | None, lo: int, hi: int,
                s_out: torch.Tensor) -> torch.Tensor:
        ctx.s_res, ctx.acc_dtype, ctx.bi_shape = s_res, acc.dtype, bi.shape
        ctx.res_dtype = None if res is None else res.dtype
        done = None if a is not None else native.requant_train(
            acc, bi, mult, lo, hi, float(s_out), res, mult_res, s_res if res is not None else None)
        if done is not None:
            ctx.save_for_backward(done[1], mult, mult_res, s_out)
            return done[0]
        if a is None:
            a, ri = _epilogue_terms(acc, bi, res, s_res)
        v = a.mul_(mult)
        if ri is not None and mult_res is not None:
            v.add_(ri.mul_(mult_res))
        r = v.round_()
        q = r.clamp(lo, hi)
        inside = r.eq_(q)  # 1.0 where round(v) is inside [lo, hi]: float64, for a fast backward
        del v, a, ri
        ctx.save_for_backward(inside, mult, mult_res, s_out)
        return q.float().mul_(s_out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        inside, mult, mult_res, s_out = ctx.saved_tensors
        want_bi, want_res = ctx.needs_input_grad[1], mult_res is not None and ctx.needs_input_grad[4]
        done = None if inside.dtype != torch.uint8 else native.requant_train_grad(
            grad, inside, float(s_out), mult, ctx.acc_dtype, want_bi,
            mult_res if want_res else None, ctx.s_res if want_res else None)
        if done is not None:
            g_acc, g64, g_res_ = done
            g_bi_ = g64.sum_to_size(ctx.bi_shape) if want_bi and g64 is not None else None
            return g_acc, g_bi_, None, None, g_res_, None, None, None, None, None, None
        if inside.dtype == torch.uint8:  # the built pass's mask, as 1.0/0.0 (the same products)
            inside = inside.double()
        g = (grad * s_out).double().mul_(inside)  # to_float's mul, cast back, the STE mask
        g_res = None
        if mult_res is not None and ctx.needs_input_grad[4]:
            g_res = (g * mult_res).div_(ctx.s_res).to(ctx.res_dtype)
        g.mul_(mult)
        g_bi = g.sum_to_size(ctx.bi_shape) if ctx.needs_input_grad[1] else None
        g_acc = g.to(ctx.acc_dtype)
        return g_acc, g_bi, None, None, g_res, None, None, None, None, None, None


def requant_mults(ratio: np.ndarray) -> np.ndarray:
    """``m / 2**s`` of :func:`qspec.requant_params` (float64, exact), without its last step:
    stripping ``m``'s trailing zero bits (``m/2, s-1``) leaves ``m / 2**s`` unchanged, and the
    strip loop is most of that function's time (~0.2 ms per 64-channel conv per QAT step)."""
    r = np.atleast_1d(np.asarray(ratio, np.float64))
    if np.any(r <= 0) or np.any(~np.isfinite(r)) or np.any(r >= 2.0**30):
        m, s = qspec.requant_params(r)  # raises as it does
        return _mult(m, s)
    s = (qspec.MULT_BITS - 1) - np.floor(np.log2(r)).astype(np.int64)
    m = np.rint(r * np.exp2(s.astype(np.float64))).astype(np.int64)
    over = m >= 2**qspec.MULT_BITS
    m[over] //= 2
    s[over] -= 1
    small = s > qspec.MAX_SHIFT
    if np.any(small):
        m[small] = np.rint(r[small] * 2.0**qspec.MAX_SHIFT).astype(np.int64)
        s[small] = qspec.MAX_SHIFT
    return _mult(m, s)


def _conv_mults(s_in: float, w_scale: torch.Tensor, s_out: float, s_res: float | None,
                like: torch.Tensor, fast: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A conv's ``m / 2**s`` (and the residual's ``m_res / 2**s``, sharing ``s``; None without
    a residual) as float64 tensors shaped like ``like``'s channels (``fast``: the single
    multiplier through :func:`requant_mults`, the same values)."""
    ratio = (np.float32(s_in) * w_scale.detach().cpu().numpy()).astype(np.float64) / s_out
    if s_res is None:
        if fast:
            return _t(requant_mults(ratio), like), None
        m, s = qspec.requant_params(ratio)
        return _t(_mult(m, s), like), None
    (m, m_res), s = qspec.shared_requant_params([ratio, np.full_like(ratio, s_res / s_out)])
    return _t(_mult(m, s), like), _t(_mult(m_res, s), like)


class ConvInts(NamedTuple):
    """A fused conv's integers as :func:`int_conv_fast` runs them (:func:`conv_ints`)."""

    weight: torch.Tensor  # the int8 weight's values, Tensor[O, I/g, kh, kw] in the conv's dtype
    bias: torch.Tensor  # the int32 bias, float64 Tensor[1, O, 1, 1]
    mult: torch.Tensor  # m / 2**s, float64 Tensor[1, O, 1, 1]
    mult_res: torch.Tensor | None  # m_res / 2**s of the residual, or None
    chunks: tuple[int, ...] | None  # input-channel split sizes summed in float32 (exact); None: one conv
    dtype: torch.dtype  # the accumulation dtype of the conv: float32 or float64
    lo: int  # the output's integer clip (dtype range ∩ activation clip)
    hi: int
    s_out: torch.Tensor  # the output scale, float32 0-dim


def conv_ints(w: torch.Tensor, b: torch.Tensor, conv: Any, s_in: float, s_res: float | None,
              s_out: float, pow2: bool, in_dtype: str, exact: bool, out_dtype: str,
              clip: tuple[int, int] | None) -> ConvInts:
    """The integers :func:`int_conv` computes on every call, computed once (no gradients): the
    same functions, so :func:`int_conv_fast` with them gives :func:`int_conv`'s values bit for
    bit. Exact int8 accumulation over ``K = I/g·kh·kw >= 1032`` terms is split into input-channel
    chunks of at most :data:`F32_CHUNK` terms, each exact in float32 (instead of a float64 conv)."""
    with torch.no_grad():
        wi, w_scale = int_weight(w, pow2, b, s_in)
        kk = int(np.prod(w.shape[2:]))
        k = int(w.shape[1]) * kk
        f64 = in_dtype != "int8" or (exact and k * 128 * 127 >= 2**24)
        chunks = None
        if f64 and in_dtype == "int8" and conv.groups == 1 and kk <= F32_CHUNK:
            per = F32_CHUNK // kk
            n = -(-int(w.shape[1]) // per)
            size = -(-int(w.shape[1]) // n)
            chunks = tuple(min(size, int(w.shape[1]) - i) for i in range(0, int(w.shape[1]), size))
            f64 = False
        acc_scale = torch.tensor(s_in, dtype=torch.float32, device=w.device) * w_scale.float()
        bi = torch.round(b.float() / acc_scale).clamp(*qspec.QRANGE["int32"]).double()
        mult, mult_res = _conv_mults(s_in, w_scale, s_out, s_res, bi)
        lo, hi = _bounds(out_dtype, clip)
        cl = conv.weight.dim() == 4 and not conv.weight.is_contiguous() and \
            conv.weight.is_contiguous(memory_format=torch.channels_last)
        # (the weight's layout: oneDNN runs a channels-last model's convs 6-15 % faster with a
        # channels-last weight, and these sums are exact whatever its order)
        layout = torch.channels_last if cl else torch.contiguous_format
        return ConvInts(wi.to(torch.float64 if f64 else torch.float32).contiguous(
                            memory_format=layout),
                        bi.reshape(1, -1, 1, 1), mult, mult_res, chunks,
                        torch.float64 if f64 else torch.float32, lo, hi,
                        torch.tensor(s_out, dtype=torch.float32, device=w.device))


_scratch = threading.local()


def _buffer(slot: int, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A work tensor shaped and laid out like ``like`` in ``dtype``, reusing this thread's
    buffer ``slot`` (its pages stay mapped: fresh large tensors cost page faults). Valid until
    the next call for the same slot; only for temporaries of one function call."""
    if not (like.is_contiguous() or like.is_contiguous(memory_format=torch.channels_last)):
        return torch.empty_like(like, dtype=dtype)
    bufs: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = _scratch.__dict__.setdefault(
        "bufs", {})
    key = (slot, dtype, like.device)
    flat = bufs.get(key)
    if flat is None or flat.numel() < like.numel():
        bufs[key] = flat = torch.empty(like.numel(), dtype=dtype, device=like.device)
    return flat[:like.numel()].as_strided(like.shape, like.stride())


def free_buffers() -> None:
    """Drop this thread's work buffers of the fast eval paths (they grow to the largest conv
    output seen, in float64)."""
    _scratch.__dict__.pop("bufs", None)


@torch.no_grad()
def int_conv_fast(x: torch.Tensor, res: torch.Tensor | None, p: ConvInts, conv: Any, s_in: float,
                  s_res: float | None) -> torch.Tensor:
    """:func:`int_conv`'s eval values (no gradients) from prepared integers ``p``, epilogue in
    place: ``sat(clip(round((acc + b)·m/2**s [+ r·m_res/2**s])))·s_out``."""
    xi = native.quantize(x, s_in, out=_buffer(0, x, p.dtype)) \
        if p.dtype == torch.float32 and x.dtype == torch.float32 else None  # one pass, same bits
    if xi is None:
        xi = torch.div(x.to(p.dtype), s_in, out=_buffer(0, x, p.dtype)).round_()

    def conv_of(xs: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
        return F.conv2d(xs, ws, None, conv.stride, conv.padding, conv.dilation, conv.groups)

    chunks = [(xi, p.weight)] if p.chunks is None else list(
        zip(xi.split(p.chunks, 1), p.weight.split(p.chunks, 1), strict=True))
    first = conv_of(*chunks[0])
    if len(chunks) > 1:
        acc = _buffer(1, first, torch.float64).copy_(first)  # exact: integers (< 2**24)
        for xs, ws in chunks[1:]:  # exact integer partial sums, added exactly in float64
            acc.add_(conv_of(xs, ws))
    has_res = res is not None and s_res is not None and p.mult_res is not None
    src = first if len(chunks) == 1 else acc  # a float32 conv output: overwritten in place
    y = native.requant(src, p.bias, p.mult, p.lo, p.hi, res if has_res else None,
                       p.mult_res if has_res else None, out_scale=float(p.s_out),
                       out=src if src.dtype == torch.float32 else None,
                       res_div=s_res if has_res else None)  # the residual's integers inside
    if y is not None:
        return y
    ri = None
    if has_res:
        ri = _buffer(2, res, torch.float64).copy_(res).div_(s_res).round_().mul_(p.mult_res)
    fused = _fused_epilogue()
    if fused is not None:
        try:
            return fused(first if len(chunks) == 1 else acc, p.bias, p.mult, ri, p.lo, p.hi,
                         p.s_out)
        except Exception as exc:  # no compiler, unsupported device...: eager from now on
            _compiled[0] = False
            warnings.warn(f"fake-quant eval: the compiled epilogue failed ({type(exc).__name__}: "
                          f"{exc}); using the eager one", stacklevel=2)
    if len(chunks) == 1:
        acc = _buffer(1, first, torch.float64).copy_(first)  # exact: integers (< 2**24 in f32)
    acc.add_(p.bias).mul_(p.mult)
    if ri is not None:
        acc.add_(ri)
    return acc.round_().clamp_(p.lo, p.hi).to(torch.float32).mul_(p.s_out)


def _epilogue(acc: torch.Tensor, bias: torch.Tensor, mult: torch.Tensor,
              res: torch.Tensor | None, lo: int, hi: int, s_out: torch.Tensor) -> torch.Tensor:
    """The eager epilogue's expression, for ``torch.compile`` to fuse into one pass."""
    v = (acc.double() + bias) * mult
    if res is not None:
        v = v + res
    return v.round().clamp(lo, hi).float() * s_out


_compiled: list[Any] = [os.environ.get("HAT_BPU_COMPILE_FQ", "") not in ("", "0")]


def compile_epilogue(on: bool = True) -> None:
    """Fuse the fast path's conv epilogue with ``torch.compile`` (one pass instead of seven;
    off by default, ``HAT_BPU_COMPILE_FQ=1`` turns it on at import). The first calls compile
    (~30 s on a 2-core CPU, then cached on disk; again for a new batch-size-1 or memory-format
    variant); a failure to compile warns once and falls back to the eager epilogue."""
    _compiled[0] = on if not on or _compiled[0] in (False, True) else _compiled[0]


def _fused_epilogue() -> Any:
    """The compiled epilogue when switched on (and compiling has not failed), else None."""
    c = _compiled[0]
    if c is True:
        c = _compiled[0] = torch.compile(_epilogue, dynamic=True)
    return c or None


def int_sum(xs: list[torch.Tensor], scales: list[float], s_out: float, dtype: str,
            clip: tuple[int, int] | None, march: str | None = None) -> torch.Tensor:
    """ir ``add`` with the march's multipliers (:func:`qspec.add_params`), fake-quantized float
    output: values from the int64 ``sat(clip(round_shift(Σ x_i · m_i, s)))`` (the multipliers
    may exceed float64's exact range), gradients straight through the float64 form."""
    ms, s = qspec.add_params(list(scales), s_out, march)
    if (fast_paths() or (fast_train_paths() and torch.is_grad_enabled())) and 0 <= int(s[0]) < 62:
        args = (scales, [int(m[0]) for m in ms], [float(_mult(m, s)[0]) for m in ms], int(s[0]),
                s_out, dtype, clip)
        if fast_paths():
            return _int_sum_fast(xs, *args)
        return _IntSum.apply(args, *xs)
    xi = [to_int(x, si) for x, si in zip(xs, scales, strict=True)]
    v = sum(x * float(_mult(m, s)[0]) for x, m in zip(xi, ms, strict=True))
    assert isinstance(v, torch.Tensor)
    y = _finish(v, dtype, clip, s_out)
    with torch.no_grad():
        acc = sum(x.detach().long() * int(m[0]) for x, m in zip(xi, ms, strict=True))
        assert isinstance(acc, torch.Tensor)
        q = qspec.requantize_torch(acc, torch.full_like(acc, int(s[0])), dtype, clip)
    return y + (to_float(q, s_out) - y).detach()


def _sum_terms(xi: list[torch.Tensor], ms: list[int], mults: list[float]
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ x_i·m_i in int64, Σ x_i·mult_i in float64)`` of the integer-valued float64 ``xi``;
    the float64 sum is built in place on ``xi`` (after the int64 one has read it)."""
    acc = xi[0].long().mul_(ms[0])
    for x, m in zip(xi[1:], ms[1:], strict=True):
        acc.add_(x.long().mul_(m))
    v = xi[0].mul_(mults[0])
    for x, m in zip(xi[1:], mults[1:], strict=True):
        v.add_(x.mul_(m))
    return acc, v


def _round_shift_sat_(acc: torch.Tensor, s: int, lo: int, hi: int) -> torch.Tensor:
    """``clamp(round_half_even(acc / 2**s), lo, hi)`` of int64 ``acc``, in place: the tie rule
    folded into one shift, ``(acc + 2**(s-1) - 1 + ((acc >> s) & 1)) >> s`` (no overflow while
    ``|acc| < 2**62``)."""
    if s > 0:
        odd = torch.bitwise_right_shift(acc, s).bitwise_and_(1)
        acc.add_(2 ** (s - 1) - 1).add_(odd).bitwise_right_shift_(s)
    return acc.clamp_(lo, hi)


def _int_sum_fast(xs: list[torch.Tensor], scales: list[float], ms: list[int], mults: list[float],
                  s: int, s_out: float, dtype: str, clip: tuple[int, int] | None) -> torch.Tensor:
    """:func:`int_sum`'s values in place (no gradients): the same float64 form ``y``, the int64
    ``q = sat(clip(round_shift(Σ x_i·m_i, s)))`` with the tie rule folded into one shift
    (``(v + 2**(s-1) - 1 + ((v >> s) & 1)) >> s``: round half to even, no overflow while
    ``|v| < 2**62``), and the same ``y + (q·s_out - y)``; in one pass where the built
    epilogue serves (:func:`hat_bpu.native.int_sum`: the same bits)."""
    done = native.int_sum(xs, scales, ms, mults, s, s_out, *_bounds(dtype, clip))
    if done is not None:
        return done
    acc, v = _sum_terms([to_int(x, si) for x, si in zip(xs, scales, strict=True)], ms, mults)
    y = _finish(v, dtype, clip, s_out)
    t = to_float(_round_shift_sat_(acc, s, *_bounds(dtype, clip)), s_out)
    return t.sub_(y).add_(y)  # y + (t - y), as int_sum's straight-through form


class _IntSum(torch.autograd.Function):
    """:func:`int_sum` with gradients, fused: the values of :func:`_int_sum_fast`, the
    gradients autograd gives :func:`int_sum`'s op chain (through the float64 form ``y``: the
    output scale's multiply, the clip mask, each input's multiplier and ``1/s_i``), op by op,
    keeping only the clip mask (float64 ``1.0/0.0``)."""

    @staticmethod
    def forward(ctx: Any, args: tuple[Any, ...], *xs: torch.Tensor) -> torch.Tensor:
        scales, ms, mults, s, s_out, dtype, clip = args
        xi = [x.to(torch.float64, copy=True).div_(si).round_()
              for x, si in zip(xs, scales, strict=True)]
        acc, v = _sum_terms(xi, ms, mults)
        lo, hi = _bounds(dtype, clip)
        r = v.round_()
        q = r.clamp(lo, hi)
        inside = r.eq_(q)  # 1.0 where round(v) is inside [lo, hi]: float64, for a fast backward
        del v, xi
        t_out = torch.tensor(s_out, dtype=torch.float32, device=q.device)
        y = q.float().mul_(t_out)
        del q
        t = _round_shift_sat_(acc, s, lo, hi).float().mul_(t_out)
        ctx.save_for_backward(inside, t_out)
        ctx.scales, ctx.mults, ctx.dtypes = scales, mults, [x.dtype for x in xs]
        return t.sub_(y).add_(y)  # y + (t - y), as int_sum's straight-through form

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        inside, t_out = ctx.saved_tensors
        g = (grad * t_out).double().mul_(inside)
        grads = [(g * m).div_(si).to(dt) if need else None for m, si, dt, need in zip(
            ctx.mults, ctx.scales, ctx.dtypes, ctx.needs_input_grad[1:], strict=True)]
        return (None, *grads)


def int_requant(x: torch.Tensor, ratio: float, s_in: float, s_out: float, dtype: str,
                clip: tuple[int, int] | None) -> torch.Tensor:
    """ir ``requantize`` (``m`` negative for a negative ``ratio``), fake-quantized float output."""
    m, s = qspec.requant_params(abs(ratio))
    mult = float(_mult(m, s)[0]) * (1.0 if ratio > 0 else -1.0)
    return _finish(to_int(x, s_in) * mult, dtype, clip, s_out)
