"""Each observer on a known distribution."""

from __future__ import annotations

import torch
from hat_bpu.quant.observers import Observer, quant_mse, sqnr_from_hist


def gaussian(n: int = 200_000, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def observe(method: str, *batches: torch.Tensor, **kw: float) -> Observer:
    obs = Observer(method, "int8", **kw)
    for b in batches:
        obs(b)
    return obs


def test_minmax_and_moving_average() -> None:
    a, b = torch.tensor([-1.0, 0.5]), torch.tensor([3.0, -2.0])
    assert float(observe("minmax", a, b).amax()) == 3.0
    assert float(observe("ma_minmax", a, b, averaging_constant=0.5).amax()) == 2.0


def test_percentile_matches_numpy_across_growing_ranges() -> None:
    x = gaussian()
    obs = observe("percentile", x[:1000] * 0.1, x[1000:] , percentile=99.0)
    ref = torch.quantile(torch.cat([x[:1000] * 0.1, x[1000:]]).abs(), 0.99)
    width = float(obs.hist_max) / obs.hist.numel()
    assert abs(float(obs.amax()) - float(ref)) <= 2 * width
    assert abs(float(ref) - 2.576) < 0.03  # the 99% point of |N(0, 1)|


def test_mse_and_kl_clip_a_laplacian_below_its_max() -> None:
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((200_000,))
    mx = float(x.abs().max())
    obs = observe("mse", x)
    amax = float(obs.amax())
    assert abs(amax - 9.89) < 0.3  # Banner et al. 2019: optimal 8-bit clip of Laplace(b=1)
    hist, hmax = obs.hist, float(obs.hist_max)
    assert quant_mse(hist, hmax, amax, 127) < quant_mse(hist, hmax, mx, 127)
    outliers = torch.cat([gaussian(), torch.full((20,), 50.0)])  # 0.01% far outliers
    assert 3.0 < float(observe("kl", outliers).amax()) < 10.0


def test_auto_keeps_the_best_sqnr_candidate() -> None:
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((200_000,))  # long tail: minmax is poor
    obs = observe("auto", x)
    amax = float(obs.amax())
    cands = obs.candidates()
    best = max(sqnr_from_hist(obs.hist, float(obs.hist_max), v, 127) for v in cands.values())
    assert abs(sqnr_from_hist(obs.hist, float(obs.hist_max), amax, 127) - best) < 1e-6
    assert obs.choice != "minmax" and amax < float(x.abs().max()) - 1
    fresh = Observer("auto", "int8")
    fresh.load_state_dict(obs.state_dict())
    assert fresh.choice == obs.choice  # persisted for quant-debug
