"""Range observers for symmetric activation quantization: each turns data into an ``amax``.

* ``minmax``: the largest ``|x|`` seen.
* ``ma_minmax``: moving average of each batch's ``|x|`` maximum (``averaging_constant`` c:
  ``amax ← (1 - c) * amax + c * batch_amax``; the first batch sets it).
* ``percentile``: the ``percentile`` of ``|x|`` (from a histogram).
* ``mse``: the clipping value minimising the real fake-quant error: for each candidate, the
  scale the march would use (power of two where it asks), then the squared error of
  ``clamp(round(x / scale)) · scale`` over the histogram of the calibration data.
* ``kl``: TensorRT's entropy calibration: every threshold from ``qmax + 1`` bins to the last,
  the bin-0 (zero) spike replaced by bin 1 as TensorRT does, never above the data's maximum.
  int8 only: a ``BINS``-bin histogram cannot resolve int16's 32768 levels, so ``kl`` on an
  int16 tensor is refused (``auto`` skips it there).
* ``auto``: computes the candidates of all the above on the same histogram and keeps, per
  tensor, the one with the least measured fake-quant error (as ``mse`` measures it) on the
  calibration data. The chosen method is recorded in ``choice``.
* a plugin's: a range rule another plugin adds through the hook ``bpu_observers``
  (:mod:`hat_bpu.hookspecs`), fed the same histogram (:func:`resolve` registers it).

The histogram (``BINS`` bins of ``|x|`` over ``[0, hist_max]``) grows by merging bins when a
larger value arrives, so its buffers keep a fixed shape (state_dict round-trips).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from hat_bpu.quant.qspec import qrange, scale_from_amax

OBSERVERS = ("minmax", "ma_minmax", "percentile", "mse", "kl", "auto")
HIST_OBSERVERS = ("percentile", "mse", "kl", "auto")
BINS = 2048
CHOICES = ("minmax", "percentile", "mse", "kl")

RangeFn = Callable[..., float]
"""A plugin observer's range rule: ``rule(*, hist, hist_max, max_abs, dtype, pow2) -> amax``."""

_PLUGIN_RULES: dict[str, RangeFn] = {}


def resolve(name: str) -> None:
    """Check ``[quantize] observer = name``: one of :data:`OBSERVERS`, else a rule a loaded
    plugin adds through ``bpu_observers`` (the run's plugins' rules are then the ones
    :class:`Observer` accepts).

    :raises UserError: no loaded plugin adds ``name``, listing every known observer.
    """
    if name in OBSERVERS:
        return
    from hat_bpu.pluggable import collect
    from hatcore.errors import UserError

    added = collect("bpu_observers", OBSERVERS, "observer")
    _PLUGIN_RULES.clear()  # the current plugin manager's rules only
    _PLUGIN_RULES.update({n: rule for n, (_, rule) in added.items() if callable(rule)})
    if name not in added:
        known = [*OBSERVERS, *(f"{n} (plugin {p})" for n, (p, _) in added.items())]
        raise UserError(f"[quantize] observer = {name!r}: unknown observer; expected one of "
                        f"{', '.join(known)}")
    plugin, rule = added[name]
    if not callable(rule):
        raise UserError(f"plugin {plugin!r}: bpu_observers gives {name!r} = {rule!r}, not a "
                        "callable range rule")


class Observer(nn.Module):
    """Collects statistics of a tensor; :meth:`amax` gives the symmetric range."""

    max_abs: torch.Tensor
    ma_abs: torch.Tensor
    count: torch.Tensor
    hist: torch.Tensor
    hist_max: torch.Tensor
    choice_idx: torch.Tensor

    def __init__(self, method: str = "minmax", dtype: str = "int8", averaging_constant: float = 0.1,
                 percentile: float = 99.99, pow2: bool = False) -> None:
        super().__init__()
        if method not in OBSERVERS and method not in _PLUGIN_RULES:
            raise ValueError(f"unknown observer {method!r}; expected one of "
                             f"{', '.join([*OBSERVERS, *_PLUGIN_RULES])}")
        if method == "kl" and dtype != "int8":
            raise ValueError(f"observer 'kl' calibrates int8 only ({BINS}-bin histogram, "
                             f"{dtype} has {qrange(dtype)[1] + 1} levels); use mse, percentile "
                             "or auto for int16 tensors (e.g. an override of the head)")
        self.method, self.dtype, self.pow2 = method, dtype, pow2
        self.averaging_constant, self.percentile = averaging_constant, percentile
        self._histogram = method in HIST_OBSERVERS or method not in OBSERVERS  # plugin rules too
        self.register_buffer("max_abs", torch.tensor(0.0))  # minmax
        self.register_buffer("ma_abs", torch.tensor(0.0))  # moving average
        self.register_buffer("count", torch.tensor(0, dtype=torch.long))
        if self._histogram:
            self.register_buffer("hist", torch.zeros(BINS, dtype=torch.float64))
            self.register_buffer("hist_max", torch.tensor(0.0))
        # auto: the method that won, as an index into CHOICES (persisted for quant-debug)
        self.register_buffer("choice_idx", torch.tensor(-1, dtype=torch.long))

    @property
    def choice(self) -> str:
        """The method whose range is used (``auto``: the winner, once computed)."""
        idx = int(self.choice_idx)
        return CHOICES[idx] if idx >= 0 else self.method

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> None:
        """Observe one batch (any shape)."""
        a = x.detach().abs().float()
        batch_max = a.max() if a.numel() else torch.tensor(0.0, device=a.device)
        self.max_abs.copy_(torch.maximum(self.max_abs, batch_max))
        c = self.averaging_constant
        ma = batch_max if int(self.count) == 0 else (1 - c) * self.ma_abs + c * batch_max
        self.ma_abs.copy_(ma)
        self.count += 1
        if self._histogram:
            self._update_hist(a)

    def update_ma(self, x: torch.Tensor, c: float) -> None:
        """QAT-time update: moving average of the batch maxima with constant ``c``."""
        batch_max = x.detach().abs().max().float()
        self.ma_abs.mul_(1 - c).add_(c * batch_max)
        self.max_abs.copy_(torch.maximum(self.max_abs, batch_max))

    def _update_hist(self, a: torch.Tensor) -> None:
        m = float(a.max()) if a.numel() else 0.0
        if m <= 0.0:
            self.hist[0] += a.numel()
            return
        hmax = float(self.hist_max)
        if m > hmax:
            if hmax > 0.0:  # merge bins so the old histogram fits in the new range
                factor = 2 ** math.ceil(math.log2(m / hmax))
                merged = self.hist.new_zeros(BINS)
                if factor >= BINS:
                    merged[0] = self.hist.sum()
                else:
                    merged[: BINS // factor] = self.hist.view(-1, factor).sum(1)
                self.hist.copy_(merged)
                hmax *= factor
            else:
                hmax = m
            self.hist_max.fill_(hmax)
        h = torch.histc(a.flatten(), bins=BINS, min=0.0, max=hmax)
        self.hist += h.double().to(self.hist.device)

    def amax(self) -> torch.Tensor:
        """The chosen absolute range (0-dim tensor)."""
        if self.method == "minmax":
            return self.max_abs.clone()
        if self.method == "ma_minmax":
            return self.ma_abs.clone()
        if int(self.count) == 0 or float(self.hist_max) <= 0:
            return self.max_abs.clone()
        if self.method not in OBSERVERS:
            if self.method not in _PLUGIN_RULES:
                raise ValueError(f"observer {self.method!r} is a plugin's, and the plugins of "
                                 "the current run do not give it")
            top = float(self.max_abs)
            amax = float(_PLUGIN_RULES[self.method](
                hist=self.hist.detach().cpu(), hist_max=float(self.hist_max), max_abs=top,
                dtype=self.dtype, pow2=self.pow2))
            return torch.tensor(min(max(amax, 0.0), top))
        if self.method != "auto":
            return torch.tensor(self.candidates([self.method])[self.method])
        cands = self.candidates(list(CHOICES) if self.dtype == "int8" else
                                [c for c in CHOICES if c != "kl"])
        hist, hmax = self.hist.detach().cpu(), float(self.hist_max)
        errs = {k: fq_error(hist, hmax, v, self.dtype, self.pow2) for k, v in cands.items()}
        best = min(errs, key=lambda k: (errs[k], CHOICES.index(k)))
        self.choice_idx.fill_(CHOICES.index(best))
        return torch.tensor(cands[best])

    def candidates(self, methods: list[str]) -> dict[str, float]:
        """The clipping value of each of ``methods`` (of :data:`CHOICES`), none above the max."""
        hist, hmax, qmax = self.hist.detach().cpu(), float(self.hist_max), qrange(self.dtype)[1]
        top = float(self.max_abs)
        fns = {
            "minmax": lambda: top,
            "percentile": lambda: percentile_from_hist(hist, hmax, self.percentile),
            "mse": lambda: mse_from_hist(hist, hmax, self.dtype, self.pow2, top),
            "kl": lambda: kl_from_hist(hist, hmax, qmax),
        }
        return {k: min(float(fns[k]()), top) for k in methods}


def percentile_from_hist(hist: torch.Tensor, hmax: float, pct: float) -> float:
    """The ``pct`` percentile of ``|x|`` (upper edge of the bin where it falls)."""
    cdf = hist.cumsum(0) / hist.sum().clamp(min=1)
    idx = int(torch.searchsorted(cdf, torch.tensor(pct / 100.0, dtype=cdf.dtype)))
    return hmax * min(idx + 1, hist.numel()) / hist.numel()


def _points(hist: torch.Tensor, hmax: float, sub: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """``sub`` evenly spread points per bin and their weights (the bin's count / sub)."""
    n = hist.numel()
    width = hmax / n
    offs = (np.arange(sub) + 0.5) / sub
    x = ((np.arange(n)[:, None] + offs[None, :]) * width).ravel()
    w = np.repeat(hist.numpy().astype(np.float64) / sub, sub)
    keep = w > 0
    return x[keep], w[keep]


def _scale(amax: float, dtype: str, pow2: bool) -> float:
    return float(scale_from_amax(torch.tensor(max(amax, 0.0)), dtype, pow2))


def fq_error(hist: torch.Tensor, hmax: float, amax: float, dtype: str, pow2: bool) -> float:
    """Mean squared error of fake-quantizing the histogram's data (``|x|``) with range
    ``amax``: the march's scale (:func:`qspec.scale_from_amax`), round half to even, clamp."""
    x, w = _points(hist, hmax)
    s = _scale(amax, dtype, pow2)
    q = np.clip(np.rint(x / s), 0, qrange(dtype)[1]) * s
    return float((w * (x - q) ** 2).sum() / max(w.sum(), 1e-30))


def mse_from_hist(hist: torch.Tensor, hmax: float, dtype: str, pow2: bool, top: float,
                  steps: int = 256) -> float:
    """The clipping value with the least :func:`fq_error`, searched over ``steps`` fractions of
    the data max ``top`` (on a power-of-two march, candidates that give the same scale tie and
    the smallest is kept)."""
    x, w = _points(hist, hmax)
    cands = top * (np.arange(1, steps + 1) / steps)
    qmax = qrange(dtype)[1]
    best, best_err = top, float("inf")
    for a in cands:
        s = _scale(float(a), dtype, pow2)
        q = np.clip(np.rint(x / s), 0, qmax) * s
        err = float((w * (x - q) ** 2).sum())
        if err < best_err * (1 - 1e-12):
            best, best_err = float(a), err
    return best


def kl_from_hist(hist: torch.Tensor, hmax: float, qmax: int) -> float:
    """TensorRT's entropy calibration over the histogram of ``|x|`` (int8: 128 levels).

    For every threshold bin ``i`` from 128 to the last: the reference ``P`` is the first ``i``
    bins with the outliers folded into bin ``i - 1``; ``Q`` merges those ``i`` bins into 128
    levels and spreads each level back evenly over its non-empty bins; the ``i`` with the least
    ``KL(P || Q)`` wins, its upper edge is the range. Bin 0 (the zeros of a ReLU) is replaced
    by bin 1's count first, as TensorRT does, so the spike does not dominate the divergence.

    Every threshold's divergence is first computed in closed form from prefix sums
    (:func:`_kl_closed_form`, O(levels) per threshold instead of O(i)); the thresholds within
    a rounding margin of the least are then recomputed term by term (:func:`_kl_at`) and the
    first least of those wins, so the result is the term-by-term scan's.
    """
    levels = qmax + 1
    h = hist.numpy().astype(np.float64).copy()
    nbins = h.size
    if nbins > 1:
        h[0] = h[1]
    if nbins < levels:
        return hmax
    tail = np.concatenate([np.cumsum(h[::-1])[::-1], [0.0]])  # tail[i] = sum(h[i:])
    approx, scale = _kl_closed_form(h, levels)
    margin = 1e-9 * (1.0 + scale)  # far above the closed form's rounding (~1e-15 x scale)
    near = np.flatnonzero(approx <= approx.min() + margin) + levels
    best, best_i = float("inf"), nbins
    for i in near:
        kl = _kl_at(h, tail, int(i), levels)
        if kl < best:
            best, best_i = kl, int(i)
    return hmax * best_i / nbins


def _kl_at(h: np.ndarray, tail: np.ndarray, i: int, levels: int) -> float:
    """KL(P || Q) of threshold bin ``i``, term by term (see :func:`kl_from_hist`)."""
    p = h[:i].copy()
    p[i - 1] += tail[i]
    seg = h[:i]
    group = np.arange(i) * levels // i
    nz = seg > 0
    sums = np.bincount(group, seg, levels)
    cnts = np.bincount(group, nz.astype(np.float64), levels)
    q = np.where(nz, sums[group] / np.maximum(cnts[group], 1), 0.0)
    ps, qs = p / max(p.sum(), 1e-30), q / max(q.sum(), 1e-30)
    m = ps > 0
    with np.errstate(divide="ignore"):
        return float((ps[m] * np.log(ps[m] / np.maximum(qs[m], 1e-12))).sum())


def _kl_closed_form(h: np.ndarray, levels: int) -> tuple[np.ndarray, float]:
    """KL(P || Q) of every threshold ``i = levels .. len(h)`` from prefix sums, and the size of
    the terms that cancel in it (for the rounding margin).

    With ``S = sum(h)`` (= sum P for every i), ``H(k) = sum(h[:k])`` (= sum Q), group ``g``'s mean
    ``m_g = sums_g / nonzero_g`` (groups are ``[ceil(g i / L), ceil((g+1) i / L))``) and the last
    bin ``i-1`` in group ``L-1``::

        S·KL = sum_{j<i-1} h_j log h_j - sum_g sums_g log m_g + h_{i-1} log m_{L-1}
               + H(i-1) (log H(i) - log S) + p_{i-1} log(p_{i-1} H(i) / (S q_{i-1}))

    where ``p_{i-1} = h_{i-1} + sum(h[i:])`` and ``q_{i-1} = m_{L-1}`` if ``h_{i-1} > 0``, else
    the term-by-term floor 1e-12 of ``q / H(i)``.
    """
    n = h.size
    total = max(float(h.sum()), 1e-30)
    with np.errstate(divide="ignore", invalid="ignore"):
        hlogh = np.where(h > 0, h * np.log(np.where(h > 0, h, 1.0)), 0.0)
    zero = np.zeros(1)
    H = np.concatenate([zero, np.cumsum(h)])
    HL = np.concatenate([zero, np.cumsum(hlogh)])
    NZ = np.concatenate([zero, np.cumsum(h > 0)])
    i = np.arange(levels, n + 1)
    g = np.arange(levels + 1)
    start = (g[None, :] * i[:, None] + levels - 1) // levels  # [I, L+1], start[:, L] = i
    sums = H[start[:, 1:]] - H[start[:, :-1]]
    cnts = NZ[start[:, 1:]] - NZ[start[:, :-1]]
    with np.errstate(divide="ignore", invalid="ignore"):
        logm = np.where(cnts > 0, np.log(np.where(sums > 0, sums, 1.0) / np.maximum(cnts, 1)), 0.0)
    b = (sums * logm).sum(1)
    last = h[i - 1]
    b_main = b - last * logm[:, -1]  # the last bin's own term is handled below
    hq = np.maximum(H[i], 1e-30)
    a = HL[i - 1]
    c = H[i - 1] * (np.log(hq) - np.log(total))
    p_last = last + (H[n] - H[i])
    with np.errstate(divide="ignore", invalid="ignore"):
        q_last = np.where(last > 0, np.exp(logm[:, -1]) / hq, 0.0)
        ps_last = p_last / total
        t_last = np.where(p_last > 0, ps_last * np.log(ps_last / np.maximum(q_last, 1e-12)), 0.0)
    kl = (a - b_main + c) / total + t_last
    scale = float(np.max(np.abs(a) + np.abs(b_main) + np.abs(c)) / total)
    return kl, scale
