"""hat-bpu's built passes (``hat_bpu._native``, compiled with the package) behind plain calls.

Each does in one pass over memory what the torch code does in several, each operation the same
IEEE float32/float64 operation as torch's, so the same bits (``tests/test_native.py`` checks
every one against the torch expression it replaces): :func:`requant` the conv epilogue
``clamp(round_half_even((acc + bias)·mult [+ res·res_mult | + res]))`` to float32 (optionally
``· out_scale``), :func:`quantize` a conv's input integers, :func:`int_sum` fake-quant eval's
adds, :func:`add_int` the simulator's exact int64 adds, :func:`fake_quant` QAT's activation
fake quant (:func:`mask_mul` its backward), :func:`requant_train` / :func:`requant_train_grad`
QAT's conv epilogue and its backward, :func:`peak` QAT's range update of a conv output,
:func:`peak_abs` the simulator's exactness check. Each returns None whenever it
cannot serve a call (the extension was not built, ``HAT_BPU_NATIVE=0``, a tensor not on the CPU
or laid out otherwise than NCHW/NHWC-dense) and the caller runs its torch passes.

Threads: built with OpenMP (where the compiler has it), a pass over 2**16 elements or more
splits over torch's thread count (``torch.get_num_threads()``, read at each call), in the OpenMP
runtime torch has loaded — the threads torch's own kernels run on, not a second pool competing
with them (:func:`threads` pins the count). The values do not depend on the split.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

try:
    from hat_bpu import _native  # type: ignore[attr-defined]
except ImportError:  # built without a C compiler: the torch passes serve
    _native = None

_on = [_native is not None and os.environ.get("HAT_BPU_NATIVE", "1") not in ("", "0")]
_threads: list[int | None] = [None, 0]  # [pinned count or None, the count last set]


def _sync_threads() -> None:
    """The built passes' thread count: the pinned one, else torch's."""
    n = _threads[0] or torch.get_num_threads()
    if n != _threads[1]:
        _threads[1] = n
        _native.set_threads(n)


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[None]:
    """Within the block the built passes use ``n`` threads (None: torch's count)."""
    old = _threads[0]
    _threads[0] = n
    try:
        yield
    finally:
        _threads[0] = old


def available() -> bool:
    """True when the built passes may serve calls (built, and not switched off)."""
    return _on[0]


@contextlib.contextmanager
def disabled(off: bool = True) -> Iterator[None]:
    """Within the block every built pass declines its calls (the torch passes run)."""
    old = _on[0]
    _on[0] = _native is not None and not off
    try:
        yield
    finally:
        _on[0] = old


def _layout(t: torch.Tensor) -> tuple[int, int, int] | None:
    """(outer, C, inner) of a 4-d CPU tensor dense in NCHW or NHWC order, or of a 2-d
    [rows, C] one; None otherwise."""
    if t.device.type != "cpu":
        return None
    if t.dim() == 2 and t.is_contiguous():
        return t.shape[0], t.shape[1], 1
    if t.dim() != 4:
        return None
    n, c, h, w = t.shape
    if t.is_contiguous(memory_format=torch.channels_last):
        return n * h * w, c, 1
    if t.is_contiguous():
        return n, c, h * w
    return None


def _per_channel(v: torch.Tensor | None, c: int) -> torch.Tensor | None | bool:
    """``v`` as ``c`` dense float64 CPU values (None stays None); False when it is not that."""
    if v is None:
        return None
    v = v.reshape(-1)
    if v.dtype != torch.float64 or v.numel() != c or not v.is_contiguous() or \
            v.device.type != "cpu":
        return False
    return v


def requant(acc: torch.Tensor, bias: torch.Tensor | None, mult: torch.Tensor,
            lo: float, hi: float, res: torch.Tensor | None = None,
            res_mult: torch.Tensor | None = None, out_scale: float | None = None,
            out: torch.Tensor | None = None, res_div: float | None = None
            ) -> torch.Tensor | None:
    """The float32 result laid out as ``acc``; None when not served.

    :param acc: the accumulators, float32 or float64 (integers).
    :param bias: per-channel float64 added first (None: none), as ``mult`` (per-channel
        float64 multiplier); constants not of that form decline the call.
    :param res: a residual of ``acc``'s shape and layout: float32 integers times the
        per-channel float64 ``res_mult``, or float64 already multiplied (``res_mult`` None).
        With ``res_div`` (float32 ``res`` only) the residual is fake-quant values, taken as
        ``round_half_even(float64(res) / res_div)`` before the multiplier.
    :param out_scale: a float32 multiplier of the clamped integers (None: none).
    :param out: the float32 result tensor (laid out as ``acc``), else allocated.
    """
    if not _on[0] or acc.dtype not in (torch.float32, torch.float64) or (
            res_div is not None and (res is None or res.dtype != torch.float32 or not res_div)):
        return None
    geo = _layout(acc)
    if geo is None or (res is not None and (res.shape != acc.shape or res.stride() != acc.stride()
                                            or res.dtype not in (torch.float32, torch.float64)
                                            or (res.dtype == torch.float32) != (res_mult is not None)
                                            or res.device != acc.device)):
        return None
    outer, c, inner = geo
    bias, mult, res_mult = (_per_channel(bias, c), _per_channel(mult, c),
                            _per_channel(res_mult, c))
    if bias is False or res_mult is False or not isinstance(mult, torch.Tensor):
        return None
    if out is None:
        out = torch.empty_like(acc, dtype=torch.float32)
    elif out.dtype != torch.float32 or out.shape != acc.shape or out.stride() != acc.stride():
        raise ValueError("out must be float32 and laid out as acc")
    _sync_threads()
    _native.requant(
        acc.data_ptr(), int(acc.dtype == torch.float64), 0 if bias is None else bias.data_ptr(),
        mult.data_ptr(), 0 if res is None else res.data_ptr(),
        int(res is not None and res.dtype == torch.float64),
        0 if res_mult is None else res_mult.data_ptr(), float(res_div or 0.0), float(lo),
        float(hi), out.data_ptr(), int(out_scale is not None),
        1.0 if out_scale is None else float(out_scale), 0, outer, c, inner)
    return out


def requant_train(acc: torch.Tensor, bias: torch.Tensor, mult: torch.Tensor, lo: float,
                  hi: float, out_scale: float, res: torch.Tensor | None = None,
                  res_mult: torch.Tensor | None = None, res_div: float | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """QAT's conv epilogue (:class:`hat_bpu.quant.intmath._ConvEpilogue`'s forward) in one pass:
    :func:`requant` with a bias, ``out_scale`` and, optionally, a fake-quant residual
    (``res_div``), returning ``(out, mask)``: ``mask`` (uint8, laid out as ``acc``) 1 where
    ``round(v)`` is inside ``[lo, hi]`` — the straight-through gradient's. None when not served."""
    if not _on[0] or acc.dtype not in (torch.float32, torch.float64) or (
            res is not None and (res_div is None or res_mult is None or res.dtype != torch.float32
                                 or res.shape != acc.shape or res.stride() != acc.stride())):
        return None
    geo = _layout(acc)
    if geo is None:
        return None
    outer, c, inner = geo
    bias, mult, res_mult = (_per_channel(bias, c), _per_channel(mult, c),
                            _per_channel(res_mult, c))
    if not isinstance(bias, torch.Tensor) or not isinstance(mult, torch.Tensor) or \
            res_mult is False:
        return None
    out = torch.empty_like(acc, dtype=torch.float32)
    mask = torch.empty_like(acc, dtype=torch.uint8)
    _sync_threads()
    _native.requant(
        acc.data_ptr(), int(acc.dtype == torch.float64), bias.data_ptr(), mult.data_ptr(),
        0 if res is None else res.data_ptr(), 0,
        0 if res_mult is None else res_mult.data_ptr(), float(res_div or 0.0), float(lo),
        float(hi), out.data_ptr(), 1, float(out_scale), mask.data_ptr(), outer, c, inner)
    return out, mask


def requant_train_grad(grad: torch.Tensor, mask: torch.Tensor, out_scale: float,
                       mult: torch.Tensor, acc_dtype: torch.dtype, bias_terms: bool,
                       res_mult: torch.Tensor | None = None, res_div: float | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None:
    """The backward of :func:`requant_train` in one pass, autograd's operations in its order:
    ``g = float64(grad · out_scale) · mask``, the residual's gradient ``float32((g · res_mult) /
    res_div)`` (with ``res_mult``), ``g · mult`` as the accumulator's gradient (``acc_dtype``)
    and, with ``bias_terms``, in float64 (the bias gradient's terms, for torch to sum).
    Returns ``(g_acc, g64 | None, g_res | None)``; None when not served (``grad`` not float32
    or not laid out as ``mask``)."""
    if not _on[0] or grad.dtype != torch.float32 or grad.shape != mask.shape or \
            grad.stride() != mask.stride() or acc_dtype not in (torch.float32, torch.float64):
        return None
    geo = _layout(grad)
    if geo is None:
        return None
    outer, c, inner = geo
    mult, res_mult = _per_channel(mult, c), _per_channel(res_mult, c)
    if not isinstance(mult, torch.Tensor) or res_mult is False or (
            res_mult is not None and not res_div):
        return None
    f64 = acc_dtype == torch.float64
    g64 = torch.empty_like(grad, dtype=torch.float64) if bias_terms or f64 else None
    g32 = None if f64 else torch.empty_like(grad)
    g_res = None if res_mult is None else torch.empty_like(grad)
    _sync_threads()
    _native.requant_grad(
        grad.data_ptr(), mask.data_ptr(), float(out_scale), mult.data_ptr(),
        0 if res_mult is None else res_mult.data_ptr(), float(res_div or 0.0),
        0 if g_res is None else g_res.data_ptr(), 0 if g64 is None else g64.data_ptr(),
        0 if g32 is None else g32.data_ptr(), outer, c, inner)
    g_acc = g64 if f64 else g32
    assert g_acc is not None
    return g_acc, g64, g_res


def peak(acc: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor,
         res: torch.Tensor | None = None, res_div: float | None = None,
         res_scale: float | None = None) -> tuple[float, float] | None:
    """(min, max) of ``(float64(acc) + bias)·scale [+ round_half_even(float64(res) / res_div)·
    res_scale]`` (per-channel float64 ``bias`` and ``scale``; NaN, NaN when some value is NaN):
    the values QAT's range update of a conv output reduces, without forming them. None when not
    served."""
    if not _on[0] or acc.dtype not in (torch.float32, torch.float64) or acc.numel() == 0 or (
            res is not None and (not res_div or res_scale is None or res.dtype != torch.float32
                                 or res.shape != acc.shape or res.stride() != acc.stride())):
        return None
    geo = _layout(acc)
    if geo is None:
        return None
    outer, c, inner = geo
    bias, scale = _per_channel(bias, c), _per_channel(scale, c)
    if not isinstance(bias, torch.Tensor) or not isinstance(scale, torch.Tensor):
        return None
    _sync_threads()
    lo, hi = _native.peak(acc.data_ptr(), int(acc.dtype == torch.float64), bias.data_ptr(),
                          scale.data_ptr(), 0 if res is None else res.data_ptr(),
                          float(res_div or 0.0), float(res_scale or 0.0), outer, c, inner)
    return lo, hi


def quantize(x: torch.Tensor, s: float, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """``round_half_even(x / s)`` of a dense float32 CPU ``x`` in float32 (as ``torch.div(x,
    s).round_()``), laid out as ``x`` (``out`` may be ``x``); None when not served."""
    if not _on[0] or not _dense(x):
        return None
    if out is None:
        out = torch.empty_like(x)
    elif out.dtype != torch.float32 or out.shape != x.shape or out.stride() != x.stride():
        raise ValueError("out must be float32 and laid out as x")
    _sync_threads()
    _native.quantize(x.data_ptr(), float(s), out.data_ptr(), x.numel())
    return out


def _dense(t: torch.Tensor) -> bool:
    """A float32 CPU tensor dense in NCHW or NHWC order (elementwise passes may run over its
    memory as one flat array)."""
    return t.dtype == torch.float32 and t.device.type == "cpu" and (
        t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last))


def _alike(xs: list[torch.Tensor]) -> bool:
    """1 to 4 :func:`_dense` tensors of one shape and layout, and the extension on."""
    return _on[0] and 1 <= len(xs) <= 4 and _dense(xs[0]) and all(
        x.dtype == torch.float32 and x.shape == xs[0].shape and x.stride() == xs[0].stride() and
        x.device == xs[0].device for x in xs)


def int_sum(xs: list[torch.Tensor], scales: list[float], ms: list[int], mults: list[float],
            shift: int, s_out: float, lo: int, hi: int) -> torch.Tensor | None:
    """:func:`hat_bpu.quant.intmath._int_sum_fast`'s values in one pass: the inputs' integers
    ``round(float64(x_i) / s_i)``, the device's ``clamp(round_shift(Σ xi·m_i, shift))`` (in
    float64, exact while ``Σ |xi|·|m_i| < 2**53``: checked per element, else None), the float
    form ``clamp(round(Σ xi·mult_i))`` and ``(q·s_out - y) + y`` in float32. 1 to 4 float32
    inputs alike in shape and layout (dense, CPU); None when not served."""
    if not 0 <= shift < 62 or not _alike(xs):
        return None
    x0 = xs[0]
    total = float(sum(abs(int(m)) for m in ms))
    xbound = float(int(2.0**52 / total)) if total else 2.0**52
    if xbound < 1 or any(abs(int(m)) >= 2**53 for m in ms):
        return None
    pad = 4 - len(xs)
    out = torch.empty_like(x0)
    _sync_threads()
    ok = _native.int_sum(tuple([x.data_ptr() for x in xs] + [0] * pad),
                         tuple([float(v) for v in scales] + [1.0] * pad),
                         tuple([float(int(m)) for m in ms] + [0.0] * pad),
                         tuple([float(v) for v in mults] + [0.0] * pad), len(xs), 2.0**-shift,
                         float(lo), float(hi), float(s_out), xbound, out.data_ptr(), x0.numel())
    return out if ok else None


def fake_quant(x: torch.Tensor, inv: float, qmin: int, qmax: int, scale: float,
               mask: bool = True) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """QAT's activation fake quant in one pass: ``(clamp(round(x·inv), qmin, qmax)·scale, mask)``
    with ``mask`` (uint8) 1 where ``round(x·inv)`` is inside the range (float32 throughout,
    ``inv`` already a float32 value), as :class:`hat_bpu.quant.fake_quant._FakeQuantSTE`
    computes them with torch (``mask=False``: no mask, None in its place); None when not served
    (``x`` not a dense float32 CPU tensor)."""
    if not _on[0] or not _dense(x):
        return None
    out = torch.empty_like(x)
    inside = torch.empty_like(x, dtype=torch.uint8) if mask else None
    _sync_threads()
    _native.fake_quant(x.data_ptr(), float(inv), float(qmin), float(qmax), float(scale),
                       out.data_ptr(), 0 if inside is None else inside.data_ptr(), x.numel())
    return out, inside


def mask_mul(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
    """``grad · mask`` (a uint8 mask of 0/1 laid out as ``grad``) in one pass: the float32
    products torch's ``grad * mask`` gives (``g · 0`` keeps ``g``'s sign); None when not served."""
    if not _on[0] or not _dense(grad) or mask.dtype != torch.uint8 or \
            mask.shape != grad.shape or mask.stride() != grad.stride():
        return None
    out = torch.empty_like(grad)
    _sync_threads()
    _native.mask_mul(grad.data_ptr(), mask.data_ptr(), out.data_ptr(), grad.numel())
    return out


def add_int(xs: list[torch.Tensor], ms: list[int], shift: int, lo: int, hi: int
            ) -> torch.Tensor | None:
    """The simulator's ir add in exact int64: ``clamp(round_shift(Σ x_i·m_i, shift), lo, hi)``
    of 1 to 4 float32 tensors of integers alike in shape and layout (dense, CPU), as float32;
    None when not served."""
    if not 0 <= shift <= 62 or not _alike(xs) or any(abs(int(m)) >= 2**63 for m in ms):
        return None
    x0 = xs[0]
    pad = 4 - len(xs)
    out = torch.empty_like(x0)
    _sync_threads()
    _native.add_int(tuple([x.data_ptr() for x in xs] + [0] * pad),
                    tuple([int(m) for m in ms] + [0] * pad), len(xs), int(shift), float(lo),
                    float(hi), out.data_ptr(), x0.numel())
    return out


def peak_abs(acc: torch.Tensor, bias: torch.Tensor | None) -> float | None:
    """``max |acc + bias|`` (``bias`` per-channel float64 or None), in one pass and without
    a float64 copy; None when not served."""
    geo = _layout(acc) if _on[0] and acc.dtype in (torch.float32, torch.float64) else None
    if geo is None:
        return None
    outer, c, inner = geo
    bias = _per_channel(bias, c)
    if bias is False:
        return None
    return float(_native.peak_abs(acc.data_ptr(), int(acc.dtype == torch.float64),
                                  0 if bias is None else bias.data_ptr(), outer, c, inner))
