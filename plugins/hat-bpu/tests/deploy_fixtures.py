"""Small calibrated models for the deploy tests and benches (random weights, random data)."""

from __future__ import annotations

import torch
from example_net import SmallNet
from hat_bpu.quant.prepare import QConfig, QuantModel, prepare
from torch import nn

from hatcore import quant


def yuv_input(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Inputs as the BPU sees them: ``(p - 128) / 128`` for pixels p in 0..255, Tensor[n,3,size,size]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g).float().sub(128).div(128)


def spread_bn(net: nn.Module) -> nn.Module:
    """``net`` with non-trivial BatchNorm statistics and scales (drawn from torch's generator,
    in module order), so that folding BN into the convs is exercised."""
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    return net


def calibrate(net: nn.Module, x: torch.Tensor, pow2: bool = False, exact: bool = True
              ) -> QuantModel:
    """Prepare ``net`` (eval), calibrate it on ``x`` and leave it in fake-quant mode.

    :param exact: the quantizer's ``exact_eval`` (False: float fake quant in eval).
    """
    q = prepare(net.eval(), QConfig(pow2=pow2, exact_eval=exact))
    quant.set_mode(q, "observe")
    with torch.no_grad():
        q(x)
    quant.set_mode(q, "fake_quant")
    return q


def small_model(width: int = 16, size: int = 32, pow2: bool = False, seed: int = 0,
                exact: bool = True) -> tuple[QuantModel, torch.Tensor]:
    """A calibrated :class:`SmallNet` with non-trivial BN statistics and its calibration input."""
    torch.manual_seed(seed)
    net = spread_bn(SmallNet(width=width).eval())
    x = yuv_input(2, size, seed)
    return calibrate(net, x, pow2, exact), x


def add_inputs(g: torch.Generator, march: str | None, trial: int, shape: tuple[int, ...],
               s_out_floor: float = 0.5) -> tuple[list[torch.Tensor], list[float], float]:
    """Fake-quant inputs of an ir add (2 or 3; 2 with power-of-two scales for bernoulli2), their
    scales and an output scale: ``(xs, scales, s_out)``."""
    n = 2 if march == "bernoulli2" else 2 + trial % 2
    scales = [float(torch.rand(1, generator=g)) * 0.1 + 1e-3 for _ in range(n)]
    if march == "bernoulli2":
        scales = [2.0 ** round(torch.log2(torch.tensor(s)).item()) for s in scales]
    xs = [torch.randint(-128, 128, shape, generator=g).float() * s for s in scales]
    s_out = sum(scales) * float(torch.rand(1, generator=g) + s_out_floor)
    return xs, scales, s_out
