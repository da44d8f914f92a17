"""A stand-in for FCOS-EfficientNet-B0 (hat-fcos had not landed when the perf model was
calibrated): EfficientNet-B0 stages (lite form: ReLU6, no squeeze-excite, as deployed on BPUs),
a 64-channel FPN P3-P7 and a shared FCOS head (4+4 stacked 3x3 convs, 80 classes, box,
centerness), between a QuantStub and DeQuantStubs."""

from __future__ import annotations

import torch
from torch import nn

from hatcore.quant import DeQuantStub, QuantStub

B0 = [(1, 16, 1, 1, 3), (6, 24, 2, 2, 3), (6, 40, 2, 2, 5), (6, 80, 3, 2, 3), (6, 112, 3, 1, 5),
      (6, 192, 4, 2, 5), (6, 320, 1, 1, 3)]  # expand, channels, repeats, stride, kernel


def cbr(cin: int, cout: int, k: int, s: int = 1, g: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, s, k // 2, groups=g, bias=False),
                               nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU6()) if act else nn.Sequential(*layers)


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, expand: int, k: int, s: int) -> None:
        super().__init__()
        mid = cin * expand
        self.res = s == 1 and cin == cout
        layers = [cbr(cin, mid, 1)] if expand != 1 else []
        self.body = nn.Sequential(*layers, cbr(mid, mid, k, s, mid), cbr(mid, cout, 1, act=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.res else self.body(x)


class FcosB0Like(nn.Module):
    """``forward(img: Tensor[N,3,H,W]) -> (cls[5], box[5], ctr[5])`` lists of per-level maps."""

    def __init__(self, num_classes: int = 80, width: int = 64, width_mult: float = 1.0) -> None:
        super().__init__()
        self.quant = QuantStub(scale=1 / 128)
        self.stem = cbr(3, 32, 3, 2)
        blocks, cin, outs = [], 32, []
        for e, c, n, s, k in B0:
            c = int(c * width_mult)
            for i in range(n):
                blocks.append(MBConv(cin, c, e, k, s if i == 0 else 1))
                cin = c
            outs.append(len(blocks))
        self.blocks = nn.ModuleList(blocks)
        self.taps = (outs[2] - 1, outs[4] - 1, outs[6] - 1)  # strides 8, 16, 32
        chans = [int(40 * width_mult), int(112 * width_mult), int(320 * width_mult)]
        self.lat = nn.ModuleList(cbr(c, width, 1, act=False) for c in chans)
        self.out = nn.ModuleList(cbr(width, width, 3) for _ in chans)
        self.p6, self.p7 = cbr(width, width, 3, 2), cbr(width, width, 3, 2)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.cls_tower = nn.Sequential(*[cbr(width, width, 3) for _ in range(4)])
        self.box_tower = nn.Sequential(*[cbr(width, width, 3) for _ in range(4)])
        self.cls = nn.Conv2d(width, num_classes, 3, 1, 1)
        self.box = nn.Conv2d(width, 4, 3, 1, 1)
        self.ctr = nn.Conv2d(width, 1, 3, 1, 1)
        self.dequant = DeQuantStub()

    def forward(self, img: torch.Tensor) -> tuple[list[torch.Tensor], ...]:
        x = self.stem(self.quant(img))
        feats = []
        for i, b in enumerate(self.blocks):
            x = b(x)
            if i in self.taps:
                feats.append(x)
        p5 = self.lat[2](feats[2])
        p4 = self.lat[1](feats[1]) + self.up(p5)
        p3 = self.lat[0](feats[0]) + self.up(p4)
        ps = [self.out[0](p3), self.out[1](p4), self.out[2](p5)]
        ps += [self.p6(ps[-1])]
        ps += [self.p7(ps[-1])]
        cls, box, ctr = [], [], []
        for p in ps:
            c, r = self.cls_tower(p), self.box_tower(p)
            cls.append(self.dequant(self.cls(c)))
            box.append(self.dequant(self.box(r)))
            ctr.append(self.dequant(self.ctr(r)))
        return cls, box, ctr
