"""Integer forms of the fake-quant ops: shared by conversion and by the exact evaluation.

``conv_params`` turns a fused conv's float state into the integers of :mod:`hat_bpu.ir`
(int8 weights, int32 bias, multipliers and shifts); :func:`int_conv`, :func:`int_sum`,
:func:`int_requant` run those integers with torch: convolutions in float32 where provably exact,
else float64; the requantization ``round_shift(acc·m, s)`` as ``round_half_even(acc·(m/2**s))``
in float64 (see :func:`_finish` for why that equals the integer rule). In eval, the fake-quant
modules use them (``exact_eval``), so the fake-quant model and the integer simulator agree bit
for bit; training keeps the fast float fake quant.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from hat_bpu.quant import qspec


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
        wfq, w_scale = fake_quant_weight(w, "int8", pow2)
        wq = torch.round(wfq / w_scale.reshape(-1, 1, 1, 1)).to(torch.int8)
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


def to_int(x: torch.Tensor, scale: float) -> torch.Tensor:
    """The integers of a fake-quantized tensor (int64): ``round(x / scale)``."""
    return torch.round(x.double() / scale).long()


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
    """``sat(clip(round_half_even(v)))`` of float64 ``v = Σ x·m / 2**s``, dequantized to float32.

    Equal to the int64 ``round_shift`` (qspec) unless a value lies within ~2**-46 of a rounding
    tie without being one (exact ties are representable, so they round the same): ~1e-13.
    """
    y = torch.round(v)
    lo, hi = qspec.qrange(dtype)
    if clip is not None:
        lo, hi = max(lo, clip[0]), min(hi, clip[1])
    return to_float(y.clamp_(lo, hi), s_out)


def int_conv(x: torch.Tensor, res: torch.Tensor | None, p: dict[str, np.ndarray],
             conv: Any, s_in: float, s_res: float | None, s_out: float, dtype: str,
             clip: tuple[int, int] | None, in_dtype: str = "int8") -> torch.Tensor:
    """ir ``conv2d`` on fake-quantized float inputs; returns the fake-quantized float output.

    The integer convolution runs in float32 when provably exact (int8 input and reduction length
    ``K·128·127 < 2**24``), else in float64 (exact for int8/int16 operands).
    """
    w = p["weight"]
    k = int(np.prod(w.shape[1:]))
    exact32 = in_dtype == "int8" and k * 128 * 127 < 2**24
    ftype = torch.float32 if exact32 else torch.float64
    xq = torch.round(x.to(ftype) / s_in) if exact32 else to_int(x, s_in).double()
    acc = F.conv2d(xq, torch.from_numpy(w).to(x.device, ftype), None, conv.stride, conv.padding,
                   conv.dilation, conv.groups).double()
    acc = acc + _t(p["bias"].astype(np.float64), acc)
    v = acc * _t(_mult(p["m"], p["shift"]), acc)
    if res is not None and s_res is not None:
        v = v + to_int(res, s_res).double() * _t(_mult(p["m_res"], p["shift"]), acc)
    return _finish(v, dtype, clip, s_out)


def int_sum(xs: list[torch.Tensor], scales: list[float], s_out: float, dtype: str,
            clip: tuple[int, int] | None) -> torch.Tensor:
    """ir ``add``: ``sat(clip(round_shift(Σ x_i · m_i, s)))``, fake-quantized float output."""
    ms, s = qspec.shared_requant_params([np.array([si / s_out]) for si in scales])
    v = sum(to_int(x, si).double() * float(_mult(m, s)[0])
            for x, si, m in zip(xs, scales, ms, strict=True))
    assert isinstance(v, torch.Tensor)
    return _finish(v, dtype, clip, s_out)


def int_requant(x: torch.Tensor, ratio: float, s_in: float, s_out: float, dtype: str,
                clip: tuple[int, int] | None) -> torch.Tensor:
    """ir ``requantize`` (``m`` negative for a negative ``ratio``), fake-quantized float output."""
    m, s = qspec.requant_params(abs(ratio))
    mult = float(_mult(m, s)[0]) * (1.0 if ratio > 0 else -1.0)
    return _finish(to_int(x, s_in).double() * mult, dtype, clip, s_out)
