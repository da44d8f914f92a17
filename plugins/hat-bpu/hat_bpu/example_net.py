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
