"""FCOS head shared across levels: separable-conv towers, conv outputs (no activation)."""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import nn

from hatcore.quant import DeQuantStub, set_hint


class Tower(nn.Module):
    """``n`` separable convs (3x3 depthwise -> 1x1 pointwise) shared across levels, each
    followed by a per-level BN (statistics differ between levels, as in EfficientDet) and ReLU.
    """

    def __init__(self, c_in: int, c: int, n: int, num_levels: int) -> None:
        super().__init__()
        self.dw = nn.ModuleList(nn.Conv2d(c_in if i == 0 else c, c_in if i == 0 else c, 3, 1, 1,
                                          groups=c_in if i == 0 else c, bias=False)
                                for i in range(n))
        self.pw = nn.ModuleList(nn.Conv2d(c_in if i == 0 else c, c, 1, bias=False)
                                for i in range(n))
        self.bn = nn.ModuleList(nn.ModuleList(nn.BatchNorm2d(c) for _ in range(n))
                                for _ in range(num_levels))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor, level: int) -> torch.Tensor:
        for dw, pw, bn in zip(self.dw, self.pw, cast(nn.ModuleList, self.bn[level]), strict=True):
            x = self.act(bn(pw(dw(x))))
        return x


class FCOSHead(nn.Module):
    """``forward(feats) -> (cls [B,C,H,W] per level, bbox [B,4,H,W], centerness [B,1,H,W])``.

    Outputs are raw conv outputs, each through a DeQuantStub: sigmoid and the distance scaling
    happen when decoding (outside the deployed graph).

    :param in_channels: channels of every input level.
    :param num_classes: object classes.
    :param num_levels: number of levels (one DeQuantStub per output).
    :param feat_channels: tower width.
    :param stacked_convs: convs per tower.
    :param int16_output: hint the quantizer to keep the three output convs int16.
    :param prior_prob: initial foreground probability (classification bias).
    :param bbox_init: initial box output (distance / stride when ``upscale_bbox_pred``).
    """

    def __init__(self, in_channels: int, num_classes: int, num_levels: int,
                 feat_channels: int = 64, stacked_convs: int = 4, int16_output: bool = True,
                 prior_prob: float = 0.01, bbox_init: float = 2.0) -> None:
        super().__init__()
        self.cls_tower = Tower(in_channels, feat_channels, stacked_convs, num_levels)
        self.reg_tower = Tower(in_channels, feat_channels, stacked_convs, num_levels)
        self.cls_out = nn.Conv2d(feat_channels, num_classes, 3, 1, 1)
        self.bbox_out = nn.Conv2d(feat_channels, 4, 3, 1, 1)
        self.ctr_out = nn.Conv2d(feat_channels, 1, 3, 1, 1)
        for conv in (self.cls_out, self.bbox_out, self.ctr_out):
            nn.init.normal_(conv.weight, std=0.01)
            if int16_output:
                set_hint(conv, out_dtype="int16")
        biases = (-math.log((1 - prior_prob) / prior_prob), bbox_init, 0.0)
        for conv, value in zip((self.cls_out, self.bbox_out, self.ctr_out), biases, strict=True):
            assert conv.bias is not None
            nn.init.constant_(conv.bias, value)
        self.dequant = nn.ModuleList(DeQuantStub() for _ in range(3 * num_levels))

    def forward(self, feats: list[torch.Tensor]) -> tuple[list[torch.Tensor], ...]:
        cls, bbox, ctr = [], [], []
        for i, x in enumerate(feats):
            c, r = self.cls_tower(x, i), self.reg_tower(x, i)
            cls.append(self.dequant[3 * i](self.cls_out(c)))
            bbox.append(self.dequant[3 * i + 1](self.bbox_out(r)))
            ctr.append(self.dequant[3 * i + 2](self.ctr_out(r)))
        return cls, bbox, ctr
