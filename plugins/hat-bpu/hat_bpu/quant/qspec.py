"""THE fixed-point rules of hat-bpu: one module shared by the quantizer, simulator and compiler.

Every quantized tensor is symmetric (zero point 0): ``real = q * scale``.

* Activations: per tensor, ``int8`` (``q`` in [-128, 127]) or ``int16`` ([-32768, 32767]);
  ``scale = amax / qmax`` (``qmax`` = 127 or 32767), or on a power-of-two march the next power
  of two at or above it (``2 ** ceil(log2(amax / qmax))``), so the range never shrinks.
* Weights: ``int8`` per output channel, ``scale_w[o] = amax_w[o] / 127`` (power of two likewise).
* Biases: ``int32`` at the accumulator's scale ``s_in * s_w[o]``: ``round(b / (s_in * s_w[o]))``.
* Accumulators: integers (int32 on the device; int64 in the reference code here).
* Quantize (float → int): ``q = clamp(round(x / scale), qmin, qmax)``.
* Requantize (accumulator → output): ``y = sat(round_shift(acc * m, s))`` with an integer
  multiplier ``m`` (< 2**31) and shift ``s`` (>= 0) chosen so that ``m / 2**s ≈ s_in * s_w / s_out``
  (:func:`requant_params`; relative error < 2**-30).

**The rounding rule, everywhere: round half to even** ("banker's rounding"). It is what
``torch.round``, ``torch.fake_quantize_per_*_affine`` and ``numpy.rint`` do, so the fake-quant
model (float), the integer simulator and the compiled program all round the same way;
:func:`round_shift` is its integer form: ``round_shift(v, s) = round_half_even(v / 2**s)``.

Where the fake-quant float model and the integer model can differ (by at most 1 LSB): float32
summation order inside a convolution and the ``m / 2**s`` approximation of the scale ratio, both
only when the exact value lies within ~1e-5 LSB of a rounding boundary.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import torch

DTYPES = ("int8", "int16", "int32")
QRANGE: dict[str, tuple[int, int]] = {
    "int8": (-128, 127),
    "int16": (-32768, 32767),
    "int32": (-(2**31), 2**31 - 1),
}
#: ASSUMPTION (docs/bpu.md): requant multipliers are < 2**MULT_BITS, normalised >= 2**(MULT_BITS-1)
MULT_BITS = 31
MAX_SHIFT = 62
MIN_SCALE = 1e-12  # scales of all-zero tensors


def qrange(dtype: str) -> tuple[int, int]:
    """``(qmin, qmax)`` of an integer dtype name (``int8``, ``int16``, ``int32``)."""
    try:
        return QRANGE[dtype]
    except KeyError:
        raise ValueError(f"unknown quantized dtype {dtype!r}; expected one of {DTYPES}") from None


def scale_from_amax(amax: torch.Tensor, dtype: str, pow2: bool) -> torch.Tensor:
    """The symmetric scale for absolute maximum ``amax`` (any shape, per tensor or per channel).

    ``amax / qmax``; with ``pow2`` the next power of two at or above it. Never below MIN_SCALE.
    """
    qmax = qrange(dtype)[1]
    scale = (amax.detach().float() / qmax).clamp(min=MIN_SCALE)
    if pow2:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    return scale


def weight_scale(w: torch.Tensor, bias: torch.Tensor | None, s_in: float | None, pow2: bool
                 ) -> torch.Tensor:
    """Per-output-channel int8 weight scale of ``w`` (Tensor[O, ...]): ``max|w[o]| / 127``,
    raised where the int32 bias ``round(b / (s_in · s_w))`` would saturate, to the smallest
    scale at which it fits (a dead channel — weights ~0 next to a live bias — keeps its bias
    instead of clipping it); then the march's power-of-two rounding. Without ``bias``/``s_in``:
    ``max|w[o]| / 127`` alone."""
    amax = w.detach().abs().flatten(1).amax(1).float()
    scale = amax / 127
    if bias is not None and s_in is not None:
        floor = bias.detach().abs().float() / (float(np.float32(s_in)) * (2**31 - 1) * (1 - 2**-20))
        scale = torch.maximum(scale, floor.to(scale.device))
    return scale_from_amax(scale * 127, "int8", pow2)


def quantize_np(x: np.ndarray, scale: float | np.ndarray, dtype: str) -> np.ndarray:
    """Float → integer: ``clamp(rint(x · (1/scale)), qmin, qmax)`` as int64.

    Evaluated in float32 exactly as ``torch.fake_quantize_per_tensor_affine`` does
    (``1/scale`` rounded to float32, one float32 multiply, round half to even), so an input
    that is not on the grid quantizes identically in the fake-quant model and here.
    """
    qmin, qmax = qrange(dtype)
    inv = np.float32(1.0) / np.asarray(scale, np.float32)
    return np.clip(np.rint(np.asarray(x, np.float32) * inv), qmin, qmax).astype(np.int64)


def quantize_bias(bias: np.ndarray, s_in: float, w_scale: np.ndarray) -> np.ndarray:
    """int32 bias at the accumulator scale ``s_in · s_w[o]`` (array[O] → int64 array[O]).

    float32 arithmetic, as the fake-quant conv computes it: ``rint(b / (s_in · s_w[o]))``.
    """
    acc_scale = np.float32(s_in) * np.asarray(w_scale, np.float32)
    q = np.rint(np.asarray(bias, np.float32) / acc_scale).astype(np.float64)
    return np.clip(q, *QRANGE["int32"]).astype(np.int64)


def bias_overflows(bias: np.ndarray, s_in: float, w_scale: np.ndarray) -> int:
    """How many output channels' bias does not fit int32 at ``s_in · s_w[o]`` (then saturated).

    Happens when the input's scale is tiny (a nearly dead tensor at calibration) next to a large
    bias; the integer model then saturates the bias, as the fake quant does.
    """
    acc_scale = np.float32(s_in) * np.asarray(w_scale, np.float32)
    q = np.abs(np.asarray(bias, np.float32) / acc_scale).astype(np.float64)
    return int((q > QRANGE["int32"][1]).sum())


def requant_params(ratio: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """Integer ``(m, s)`` with ``m / 2**s ≈ ratio`` (per element of ``ratio``), both int64.

    ``m`` is normalised into [2**30, 2**31) and then stripped of trailing zero bits while
    ``s > 0`` (a power-of-two ratio gives ``m = 1``: a pure shift, as bernoulli2 needs).
    Ratios above 2**30 are refused; tiny ratios end at ``s = 62``.
    """
    r = np.atleast_1d(np.asarray(ratio, np.float64))
    if np.any(r <= 0) or np.any(~np.isfinite(r)):
        raise ValueError(f"requant ratios must be positive and finite, got {r}")
    if np.any(r >= 2.0**30):
        raise ValueError(f"requant ratio too large: {r.max()}")
    e = np.floor(np.log2(r)).astype(np.int64)
    s = (MULT_BITS - 1) - e
    m = np.rint(r * np.exp2(s.astype(np.float64))).astype(np.int64)
    over = m >= 2**MULT_BITS
    m[over] //= 2
    s[over] -= 1
    if np.any(s > MAX_SHIFT):
        small = s > MAX_SHIFT
        m[small] = np.rint(r[small] * 2.0**MAX_SHIFT).astype(np.int64)
        s[small] = MAX_SHIFT
    for _ in range(MULT_BITS):  # strip trailing zeros (vectorised, a few iterations)
        even = (m % 2 == 0) & (s > 0) & (m > 0)
        if not even.any():
            break
        m[even] //= 2
        s[even] -= 1
    return m, s


def shared_requant_params(ratios: list[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
    """Multipliers for several terms summed before one shift (add, conv + residual).

    ``sat(round_shift(sum_i x_i * m_i, s))`` with ``m_i / 2**s ≈ ratios[i]``; the shift follows
    the largest ratio (elementwise over broadcast shapes). Returns ``([m_i], s)`` as int64.
    """
    rs = np.broadcast_arrays(*[np.atleast_1d(np.asarray(r, np.float64)) for r in ratios])
    big = np.max(np.stack(rs), axis=0)
    if np.any(big >= 2.0**30) or np.any(np.stack(rs) <= 0):
        raise ValueError(f"requant ratios must be in (0, 2**30), got {[r.tolist() for r in rs]}")
    s = np.minimum((MULT_BITS - 1) - np.floor(np.log2(big)).astype(np.int64), MAX_SHIFT)
    ms = [np.rint(r * np.exp2(s.astype(np.float64))).astype(np.int64) for r in rs]
    return ms, s


def round_shift(v: np.ndarray, s: np.ndarray | int) -> np.ndarray:
    """``round_half_even(v / 2**s)`` in integers (int64 ``v``, ``s >= 0`` broadcastable).

    Exact: ``q = v >> s`` (floor), remainder ``r = v - (q << s)`` in [0, 2**s);
    ``q + 1`` when ``r > 2**(s-1)``, or when ``r == 2**(s-1)`` and ``q`` is odd.
    """
    v = np.asarray(v, np.int64)
    s = np.asarray(s, np.int64)
    q = v >> s
    r = v - (q << s)
    half = np.where(s > 0, np.left_shift(np.int64(1), np.maximum(s - 1, 0)), 1)  # 1: never a tie
    up = (r > half) | ((r == half) & (s > 0) & (q & 1 == 1))
    return q + up.astype(np.int64)


def round_shift_torch(v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """:func:`round_shift` on int64 torch tensors (any device; ``s`` broadcastable, >= 0)."""
    q = torch.bitwise_right_shift(v, s)
    r = v - torch.bitwise_left_shift(q, s)
    one = torch.ones_like(s)
    half = torch.where(s > 0, torch.bitwise_left_shift(one, (s - 1).clamp(min=0)), one)
    up = (r > half) | ((r == half) & (s > 0) & (q % 2 == 1))
    return q + up.long()


def requantize_torch(v: torch.Tensor, s: torch.Tensor, dtype: str,
                     clip: tuple[int, int] | None = None) -> torch.Tensor:
    """``sat(clip(round_shift(v, s)))`` on an int64 tensor ``v`` that already holds ``acc · m``."""
    y = round_shift_torch(v, s)
    if clip is not None:
        y = y.clamp(clip[0], clip[1])
    qmin, qmax = qrange(dtype)
    return y.clamp(qmin, qmax)


def saturate(v: np.ndarray, dtype: str) -> np.ndarray:
    """Clamp integers to the range of ``dtype`` (int64 result)."""
    qmin, qmax = qrange(dtype)
    return np.clip(v, qmin, qmax)


def requantize(
    acc: np.ndarray, m: np.ndarray | int, s: np.ndarray | int, dtype: str,
    clip: tuple[int, int] | None = None,
) -> np.ndarray:
    """The reference requantization: ``sat(clip(round_shift(acc * m, s)))``.

    :param acc: int64 accumulator (any shape); per-channel ``m``/``s`` must broadcast against
        it (e.g. shape ``[C, 1, 1]`` for NCHW).
    :param clip: optional integer activation bounds (relu: ``(0, qmax)``, relu6:
        ``(0, round(6 / s_out))``) applied before saturation.
    :returns: int64 array in the range of ``dtype``.
    """
    y = round_shift(np.asarray(acc, np.int64) * np.asarray(m, np.int64), s)
    if clip is not None:
        y = np.clip(y, clip[0], clip[1])
    return saturate(y, dtype)


def act_clip(act: str, out_scale: float, dtype: str) -> tuple[int, int] | None:
    """Integer bounds of a fused activation at the output scale (None for ``"none"``)."""
    qmin, qmax = qrange(dtype)
    if act == "none":
        return None
    if act == "relu":
        return (0, qmax)
    if act == "relu6":
        return (0, min(qmax, int(np.rint(6.0 / out_scale))))
    raise ValueError(f"unknown activation {act!r}; expected none, relu or relu6")


def is_pow2(x: float) -> bool:
    """True when ``x`` is an exact power of two."""
    return x > 0 and math.frexp(x)[0] == 0.5


# --- per-march rules (docs/bpu.md, "Integer semantics per march") ------------------------------

#: the scale policy: power-of-two scales only where Horizon's ``pow_quantization()`` is true
#: (horizon_plugin_pytorch ``qat_mode`` helpers: ``march == March.BERNOULLI``).
POW2_MARCHES = ("bernoulli",)
#: bayes family add: both inputs are brought to ``max(s_a, s_b) / 2**14`` before the sum
#: (horizon_plugin_pytorch ``functional_impl._add``: ``shift = 14``).
ADD_ALIGN_SHIFT = 14
#: bernoulli2 add: the smaller-scale input is weighted by an int8, the other by a 15-bit
#: multiplier (``qm < 2**15`` with a left shift), at ``max(s_f / 127, s_s / 2**25)``
#: (``functional_impl._add``, ``march == "bernoulli2"`` branch).
B2_FEATURE_QMAX, B2_SUMIN_BITS, B2_SUMIN_DIV = 127, 15, 2**25


def add_rule(march: str | None) -> str:
    """``align14`` (bayes, bayes-e), ``bernoulli2`` or ``shared`` (bernoulli, and no march:
    one shared shift, the generic rule) — the add of :func:`add_params`."""
    if march in ("bayes", "bayes-e"):
        return "align14"
    if march == "bernoulli2":
        return "bernoulli2"
    return "shared"


def _rint_ratio(num: float, den: float) -> int:
    """``round_half_even(num / den)`` of the exact quotient of the two floats: a float64
    quotient can round onto or off a tie (0.5 / ((1/3) / 127) is 190.5 in float64, 190.50...01
    exactly: 191, not 190)."""
    return round(Fraction(num) / Fraction(den))


def _int_weights(scales: list[float], march: str | None) -> tuple[list[int], float]:
    """Integer weights ``a_i`` and the intermediate scale ``s_int`` of a march's add:
    ``acc = Σ x_i · a_i`` is the sum at scale ``s_int`` (``a_i ≈ s_i / s_int``)."""
    rule = add_rule(march)
    if rule == "align14":
        s_int = max(scales) / 2**ADD_ALIGN_SHIFT
        return [_rint_ratio(s, s_int) for s in scales], s_int
    if rule == "bernoulli2":
        if len(scales) != 2:
            raise ValueError(f"bernoulli2 adds two tensors, got {len(scales)}")
        f, s = (0, 1) if scales[0] <= scales[1] else (1, 0)  # feature: the smaller scale
        s_int = max(scales[f] / B2_FEATURE_QMAX, scales[s] / B2_SUMIN_DIV)
        a = [0, 0]
        a[f] = int(np.clip(_rint_ratio(scales[f], s_int), -128, 127))
        sw = float(_rint_ratio(scales[s], s_int))
        mant, exp = math.frexp(sw)  # sw = mant · 2**exp, mant in [0.5, 1)
        qm = min(int(mant * 2 ** min(exp, B2_SUMIN_BITS)), 2**B2_SUMIN_BITS - 1)
        a[s] = qm << max(exp - B2_SUMIN_BITS, 0)
        return a, s_int
    raise ValueError(f"no integer-weight add on march {march!r}")


def add_int32_peak(scales: list[float], dtypes: list[str], march: str | None) -> int | None:
    """The largest ``|Σ x_i · a_i|`` of a march's int32 add intermediate over every input in
    its dtype's range (``(qmin_i)·|a_i|`` summed); None where the march has no intermediate
    (``shared``: one requantization straight from the inputs)."""
    if add_rule(march) == "shared":
        return None
    a, _ = _int_weights(scales, march)
    return sum(abs(ai) * -QRANGE[dt][0] for ai, dt in zip(a, dtypes, strict=True))


def add_params(scales: list[float], s_out: float, march: str | None
               ) -> tuple[list[np.ndarray], np.ndarray]:
    """``([m_i], s)`` of an add on ``march``: ``y = sat(round_shift(Σ x_i · m_i, s))``.

    ``shared``: :func:`shared_requant_params` of ``s_i / s_out``. ``align14`` / ``bernoulli2``:
    the march's integer weights ``a_i`` (:func:`_int_weights`), then one requantization of
    the intermediate sum ``(m, s) = requant_params(s_int / s_out)``, folded as ``m_i = a_i · m``
    (exact: integer products distribute). The intermediate is int32 on the device: where
    :func:`add_int32_peak` reaches ``2**31`` (bernoulli2, int16 inputs whose scales differ by
    more than ~500×) the device's result is not specified, and the checker refuses the add.
    """
    if add_rule(march) == "shared":
        return shared_requant_params([np.array([si / s_out]) for si in scales])
    a, s_int = _int_weights(scales, march)
    m, s = requant_params(s_int / s_out)
    return [np.array([ai * int(m[0])], np.int64) for ai in a], s
