"""BiFPN neck (EfficientDet) with plain-sum fusion, BPU-friendly: separable conv, BN, ReLU,
max-pool down, nearest up, add.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class SepConvBN(nn.Module):
    """3x3 depthwise -> 1x1 pointwise -> BN -> ReLU."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
        self.pw = nn.Conv2d(c, c, 1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.pw(self.dw(x))))


def conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))


def up_to(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Nearest-resize ``x`` to ``ref``'s spatial size."""
    return F.interpolate(x, size=ref.shape[-2:], mode="nearest")


class BiFPNLayer(nn.Module):
    """One top-down + bottom-up pass over ``n`` levels of ``c`` channels."""

    def __init__(self, n: int, c: int) -> None:
        super().__init__()
        self.n = n
        self.td = nn.ModuleList(SepConvBN(c) for _ in range(n - 1))
        self.bu = nn.ModuleList(SepConvBN(c) for _ in range(n - 1))
        self.down = nn.MaxPool2d(3, 2, 1)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        n = self.n
        td = [feats[-1]]  # top-down, coarsest first
        for i in range(n - 2, -1, -1):
            td.insert(0, self.td[i](feats[i] + up_to(td[0], feats[i])))
        out = [td[0]]  # bottom-up, finest first
        for i in range(1, n - 1):
            out.append(self.bu[i - 1](feats[i] + td[i] + self.down(out[-1])))
        out.append(self.bu[n - 2](feats[-1] + self.down(out[-1])))
        return out


class BiFPN(nn.Module):
    """``forward(feats at in_strides) -> feats at out_strides``, each ``out_channels`` wide.

    Levels beyond the backbone's coarsest stride come from 1x1 conv + BN then 3x3/2 max-pools.

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
        n_extra = len(out_strides) - len(self.use)
        self.lateral = nn.ModuleList(conv_bn(in_channels[i], out_channels) for i in self.use)
        self.extra_conv = conv_bn(in_channels[self.use[-1]], out_channels) if n_extra else \
            nn.Identity()
        self.n_extra = n_extra
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.layers = nn.ModuleList(BiFPNLayer(len(out_strides), out_channels)
                                    for _ in range(stack))
        self.out_strides, self.out_channels = out_strides, out_channels

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        xs = [lat(feats[i]) for lat, i in zip(self.lateral, self.use, strict=True)]
        if self.n_extra:
            x = self.pool(self.extra_conv(feats[self.use[-1]]))
            xs.append(x)
            for _ in range(self.n_extra - 1):
                x = self.pool(x)
                xs.append(x)
        for layer in self.layers:
            xs = layer(xs)
        return xs
