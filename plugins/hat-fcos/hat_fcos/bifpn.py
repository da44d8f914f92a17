"""BiFPN neck (EfficientDet) as Horizon HAT builds it (``fpn_name = "bifpn_sum"``).

Every node of a BiFPN layer: each input is resampled (kept, upsampled x2 or max-pooled /2, with
a 1x1 conv + BN first where its channels differ from the node's), the inputs are summed, then
ReLU -> 3x3 depthwise conv -> 1x1 conv + BN (no activation after: the next node starts with
ReLU). Extra levels beyond the backbone: 1x1 conv + BN and a 2x2 max-pool, then max-pools.
Every conv starts N(0, 0.01), biases 0 (HAT's ``_init_weights``).

One deviation, for the deployed model: upsampling is nearest (HAT: bilinear), because the
modelled BPU (hat-bpu) runs nearest resize only.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

Sampling = Literal["keep", "up", "down"]


def lateral(cin: int, cout: int) -> nn.Module:
    """1x1 conv + BN where the channels change, else nothing."""
    if cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1), nn.BatchNorm2d(cout))


class Resample(nn.Module):
    """One node input: optional 1x1 conv + BN, then keep / nearest x2 up / 2x2 max-pool down.

    ``forward(x, ref)`` returns ``x`` at ``ref``'s spatial size.
    """

    def __init__(self, sampling: Sampling, cin: int, cout: int) -> None:
        super().__init__()
        self.sampling = sampling
        self.lateral = lateral(cin, cout)
        self.pool = nn.MaxPool2d(2, 2, ceil_mode=True) if sampling == "down" else nn.Identity()

    def forward(self, x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.lateral(x))
        if self.sampling == "up":
            x = F.interpolate(x, size=ref.shape[-2:], mode="nearest")
        return x


class Node(nn.Module):
    """Resample each input, sum, then ReLU -> 3x3 depthwise -> 1x1 conv + BN."""

    def __init__(self, inputs: list[tuple[Sampling, int]], c: int) -> None:
        super().__init__()
        self.resample = nn.ModuleList(Resample(s, cin, c) for s, cin in inputs)
        self.act = nn.ReLU(inplace=False)
        self.dw = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
        self.pw = nn.Conv2d(c, c, 1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, xs: list[torch.Tensor], ref: torch.Tensor) -> torch.Tensor:
        total = self.resample[0](xs[0], ref)
        for r, x in zip(self.resample[1:], xs[1:], strict=True):
            total = total + r(x, ref)
        return self.bn(self.pw(self.dw(self.act(total))))


class BiFPNLayer(nn.Module):
    """One top-down + bottom-up pass over ``len(in_channels)`` levels, finest first.

    Top-down node i (coarsest-but-one to finest): ``feat_i`` kept + ``td_{i+1}`` up. Bottom-up
    node i: ``feat_i`` + ``td_i`` (middle levels) kept + ``out_{i-1}`` down; the coarsest level
    takes ``feat_n`` + ``out_{n-1}`` down. (HAT's node table for five levels, generalised.)
    """

    def __init__(self, in_channels: list[int], c: int) -> None:
        super().__init__()
        n = self.n = len(in_channels)
        self.td = nn.ModuleList(Node([("keep", in_channels[i]), ("up", c if i < n - 2 else
                                                                   in_channels[-1])], c)
                                for i in range(n - 1))
        self.bu = nn.ModuleList(
            Node([("keep", in_channels[i]), ("keep", c), ("down", c)] if i < n - 1 else
                 [("keep", in_channels[i]), ("down", c)], c)
            for i in range(1, n))

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        n = self.n
        td: list[torch.Tensor] = [feats[-1]]  # top-down, coarsest first
        for i in range(n - 2, -1, -1):
            td.insert(0, self.td[i]([feats[i], td[0]], feats[i]))
        out = [td[0]]  # bottom-up, finest first
        for i in range(1, n):
            ins = [feats[i], td[i], out[-1]] if i < n - 1 else [feats[i], out[-1]]
            out.append(self.bu[i - 1](ins, feats[i]))
        return out


class BiFPN(nn.Module):
    """``forward(feats at in_strides) -> feats at out_strides``, each ``out_channels`` wide.

    :param in_strides: strides of the backbone features given to ``forward``.
    :param in_channels: their channel counts.
    :param out_strides: strides produced (consecutive powers of two).
    :param out_channels: channels of every output.
    :param stack: number of BiFPN layers.
    """

    def __init__(self, in_strides: list[int], in_channels: list[int], out_strides: list[int],
                 out_channels: int = 64, stack: int = 3) -> None:
        super().__init__()
        self.use = [in_strides.index(s) for s in out_strides if s in in_strides]
        self.n_extra = len(out_strides) - len(self.use)
        c = out_channels
        self.extra = nn.ModuleList(
            nn.Sequential(lateral(in_channels[self.use[-1]] if i == 0 else c, c),
                          nn.MaxPool2d(2, 2, ceil_mode=True)) for i in range(self.n_extra))
        level_channels = [in_channels[i] for i in self.use] + [c] * self.n_extra
        self.layers = nn.ModuleList(BiFPNLayer(level_channels if k == 0 else [c] * len(out_strides),
                                               c) for k in range(stack))
        self.out_strides, self.out_channels = out_strides, out_channels
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        xs = [feats[i] for i in self.use]
        x = xs[-1]
        for extra in self.extra:
            x = extra(x)
            xs.append(x)
        for layer in self.layers:
            xs = layer(xs)
        return xs
