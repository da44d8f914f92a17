"""A small traceable conv net with every op the quantizer supports (for tests and benches).

Stem conv-BN-ReLU, a depthwise-separable block with a residual add, a max-pool, a nearest
upsample, a concat and two heads (one int16 by hint), between a QuantStub and DeQuantStubs.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from hatcore.quant import DeQuantStub, QuantStub, set_hint


def conv_bn(cin: int, cout: int, k: int = 3, s: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


class SmallNet(nn.Module):
    """``forward(img: Tensor[N, 3, H, W]) -> (cls Tensor[N, K, H/2, W/2], box Tensor[N, 4, H/2, W/2])``.

    H and W must be multiples of 4.
    """

    def __init__(self, width: int = 16, num_classes: int = 3, int16_box: bool = True) -> None:
        super().__init__()
        self.quant = QuantStub(scale=1 / 128)
        self.stem = nn.Sequential(*conv_bn(3, width, 3, 2), nn.ReLU())
        self.dw = nn.Sequential(*conv_bn(width, width, 3, 1, groups=width), nn.ReLU6())
        self.pw = nn.Sequential(*conv_bn(width, width, 1))
        self.down = nn.Sequential(*conv_bn(width, 2 * width, 3, 1), nn.ReLU())
        self.pool = nn.MaxPool2d(2, 2)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.fuse = nn.Sequential(*conv_bn(3 * width, width, 1), nn.ReLU())
        self.cls = nn.Conv2d(width, num_classes, 3, 1, 1)
        self.box = nn.Conv2d(width, 4, 3, 1, 1)
        if int16_box:
            set_hint(self.box, out_dtype="int16")
        self.dequant = DeQuantStub()

    def forward(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.stem(self.quant(img))
        x = F.relu(self.pw(self.dw(x)) + x)  # residual add fused into the pw conv
        y = self.up(self.down(self.pool(x)))
        x = self.fuse(torch.cat([x, y], dim=1))
        return self.dequant(self.cls(x)), self.dequant(self.box(x))

    def compute_loss(self, raw: tuple[torch.Tensor, torch.Tensor],
                     target: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        """MSE of both outputs against a target pair (for tests)."""
        return {"loss": F.mse_loss(raw[0], target[0]) + F.mse_loss(raw[1], target[1])}


class Scale(nn.Module):
    """A learnable scalar (FCOS's per-level box scale)."""

    def __init__(self, init: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class MiniFCOS(nn.Module):
    """An FCOS-shaped detector in miniature: strided backbone, a BiFPN-style weighted fusion
    (upsample + max-pool + normalised weights), a head shared by 3 levels with per-level Scale,
    int16 head outputs. ``forward(img) -> list of (cls, box, ctr)`` per level (float)."""

    def __init__(self, width: int = 8, num_classes: int = 3) -> None:
        super().__init__()
        self.quant = QuantStub(scale=1 / 128)
        self.c3 = nn.Sequential(*conv_bn(3, width, 3, 2), nn.ReLU6(), *conv_bn(width, width, 3, 2),
                                nn.ReLU6())
        self.c4 = nn.Sequential(*conv_bn(width, width, 3, 2, groups=width), nn.ReLU6(),
                                *conv_bn(width, width, 1))
        self.c5 = nn.Sequential(*conv_bn(width, width, 3, 2), nn.ReLU())
        self.w = nn.Parameter(torch.ones(2))
        self.fuse4 = nn.Sequential(*conv_bn(width, width, 3), nn.ReLU())
        self.down = nn.MaxPool2d(3, 2, 1)
        self.tower = nn.Sequential(*conv_bn(width, width, 3), nn.ReLU())
        self.cls = nn.Conv2d(width, num_classes, 3, 1, 1)
        self.box = nn.Conv2d(width, 4, 3, 1, 1)
        self.ctr = nn.Conv2d(width, 1, 3, 1, 1)
        for m in (self.cls, self.box, self.ctr):
            set_hint(m, out_dtype="int16")
        self.scales = nn.ModuleList([Scale(1.0), Scale(0.5), Scale(2.0)])
        self.dequant = DeQuantStub()

    def forward(self, img: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        p3 = self.c3(self.quant(img))
        p4 = self.c4(p3)
        p5 = self.c5(p4)
        w = F.relu(self.w)
        w = w / (w.sum() + 1e-4)
        p4 = self.fuse4(w[0] * p4 + w[1] * F.interpolate(p5, size=p4.shape[-2:], mode="nearest"))
        p5 = p5 + self.down(p4)
        outs = []
        for p, scale in zip((p3, p4, p5), self.scales, strict=True):
            t = self.tower(p)
            outs.append((self.dequant(self.cls(t)), self.dequant(F.relu(scale(self.box(t)))),
                         self.dequant(self.ctr(t))))
        return outs
