"""Range observers for symmetric activation quantization: each turns data into an ``amax``.

* ``minmax``: the largest ``|x|`` seen.
* ``ma_minmax``: moving average of each batch's ``|x|`` maximum (``averaging_constant`` c:
  ``amax ← (1 - c) * amax + c * batch_amax``; the first batch sets it).
* ``percentile``: the ``percentile`` of ``|x|`` (from a histogram).
* ``mse``: the clipping value minimising the expected squared quantization error (rounding
  noise ``scale² / 12`` inside, clipping error outside) over a histogram of ``|x|``.
* ``kl``: TensorRT's entropy calibration: the clipping value minimising the KL divergence
  between the histogram and its quantized version.
* ``auto``: computes the candidates of all the above on the same histogram and keeps, per
  tensor, the one with the best **SQNR** (signal power / quantization noise power, measured on
  the histogram of the calibration data). The chosen method is recorded in ``choice``.

The histogram (``BINS`` bins of ``|x|`` over ``[0, hist_max]``) grows by merging bins when a
larger value arrives, so its buffers keep a fixed shape (state_dict round-trips).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hat_bpu.quant.qspec import qrange

OBSERVERS = ("minmax", "ma_minmax", "percentile", "mse", "kl", "auto")
HIST_OBSERVERS = ("percentile", "mse", "kl", "auto")
BINS = 2048
CHOICES = ("minmax", "percentile", "mse", "kl")


class Observer(nn.Module):
    """Collects statistics of a tensor; :meth:`amax` gives the symmetric range."""

    max_abs: torch.Tensor
    ma_abs: torch.Tensor
    count: torch.Tensor
    hist: torch.Tensor
    hist_max: torch.Tensor
    choice_idx: torch.Tensor

    def __init__(self, method: str = "minmax", dtype: str = "int8", averaging_constant: float = 0.1,
                 percentile: float = 99.99) -> None:
        super().__init__()
        if method not in OBSERVERS:
            raise ValueError(f"unknown observer {method!r}; expected one of {', '.join(OBSERVERS)}")
        self.method, self.dtype = method, dtype
        self.averaging_constant, self.percentile = averaging_constant, percentile
        self.register_buffer("max_abs", torch.tensor(0.0))  # minmax
        self.register_buffer("ma_abs", torch.tensor(0.0))  # moving average
        self.register_buffer("count", torch.tensor(0, dtype=torch.long))
        if method in HIST_OBSERVERS:
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
        if self.method in HIST_OBSERVERS:
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
        cands = self.candidates()
        if self.method == "auto":
            hist = self.hist.detach().cpu()
            best = max(cands, key=lambda k: sqnr_from_hist(
                hist, float(self.hist_max), cands[k], qrange(self.dtype)[1]))
            self.choice_idx.fill_(CHOICES.index(best))
            return torch.tensor(cands[best])
        return torch.tensor(cands[self.method])

    def candidates(self) -> dict[str, float]:
        """Every histogram method's clipping value (``minmax`` included)."""
        hist, hmax, qmax = self.hist.detach().cpu(), float(self.hist_max), qrange(self.dtype)[1]
        return {
            "minmax": float(self.max_abs),
            "percentile": percentile_from_hist(hist, hmax, self.percentile),
            "mse": mse_from_hist(hist, hmax, qmax),
            "kl": kl_from_hist(hist, hmax, qmax),
        }


def _centers(hist: torch.Tensor, hmax: float) -> torch.Tensor:
    width = hmax / hist.numel()
    return (torch.arange(hist.numel(), dtype=torch.float64) + 0.5) * width


def percentile_from_hist(hist: torch.Tensor, hmax: float, pct: float) -> float:
    """The ``pct`` percentile of ``|x|`` (upper edge of the bin where it falls)."""
    cdf = hist.cumsum(0) / hist.sum().clamp(min=1)
    idx = int(torch.searchsorted(cdf, torch.tensor(pct / 100.0, dtype=cdf.dtype)))
    return hmax * min(idx + 1, hist.numel()) / hist.numel()


def quant_mse(hist: torch.Tensor, hmax: float, amax: float, qmax: int) -> float:
    """Expected squared error of quantizing the histogram's data with range ``amax``."""
    c = _centers(hist, hmax)
    scale = amax / qmax
    inside = c <= amax
    err = torch.where(inside, torch.full_like(c, scale * scale / 12.0), (c - amax) ** 2)
    return float((hist * err).sum() / hist.sum().clamp(min=1))


def sqnr_from_hist(hist: torch.Tensor, hmax: float, amax: float, qmax: int) -> float:
    """SQNR in dB of quantizing the histogram's data with range ``amax``."""
    c = _centers(hist, hmax)
    power = float((hist * c * c).sum() / hist.sum().clamp(min=1))
    noise = quant_mse(hist, hmax, max(amax, 1e-12), qmax)
    return 10 * math.log10(max(power, 1e-30) / max(noise, 1e-30))


def mse_from_hist(hist: torch.Tensor, hmax: float, qmax: int, steps: int = 128) -> float:
    """The clipping value (searched over ``steps`` fractions of ``hmax``) with the least MSE."""
    cands = [hmax * (i + 1) / steps for i in range(steps)]
    return min(cands, key=lambda a: quant_mse(hist, hmax, a, qmax))


def kl_from_hist(hist: torch.Tensor, hmax: float, qmax: int) -> float:
    """TensorRT-style entropy calibration over the histogram of ``|x|``."""
    nbins, levels = hist.numel(), qmax + 1
    h = hist.double()
    best, best_i = float("inf"), nbins
    for i in range(levels, nbins + 1, max(1, (nbins - levels) // 64)):
        p = h[:i].clone()
        p[i - 1] += h[i:].sum()
        # quantize the first i bins into `levels` groups, spread back over non-empty bins
        group = torch.arange(i) * levels // i
        seg = h[:i]
        nz = (seg > 0).double()
        sums = torch.zeros(levels, dtype=torch.float64).index_add_(0, group, seg)
        cnts = torch.zeros(levels, dtype=torch.float64).index_add_(0, group, nz)
        q = nz * (sums / cnts.clamp(min=1))[group]
        ps, qs = p / p.sum().clamp(min=1e-30), q / q.sum().clamp(min=1e-30)
        mask = ps > 0
        kl = float((ps[mask] * torch.log(ps[mask] / qs[mask].clamp(min=1e-12))).sum())
        if kl < best:
            best, best_i = kl, i
    return hmax * best_i / nbins
