"""Backend-neutral quantization vocabulary: what a model tells any quantizer.

A model marks where its quantized part begins and ends, and gives per-module hints; a quantizer
plugin reads them. Like torch.ao's QuantStub, these live in the core, not in a backend.

* :class:`QuantStub` - the input enters the integer domain here. ``scale`` fixes the input scale
  (HAT's BPU input: YUV pixels ``(p - 128) / 128``, scale 1/128).
* :class:`DeQuantStub` - outputs leave the integer domain here; what follows (decoding) stays float.
* :func:`set_hint` - per-module requests: ``out_dtype="int16"`` (e.g. a detection head's outputs),
  ``float=True`` (leave this module unquantized, for debugging).
* :func:`set_mode` - switch a prepared model between ``"observe"`` (calibration: observers
  collect ranges, outputs stay float), ``"fake_quant"`` (observers frozen, fake quantization on)
  and ``"qat"`` (fake quantization with observers still updating). Any module with a
  ``hat_set_mode(mode)`` method takes part.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

HINT_ATTR = "_hat_qhints"
MODES = ("observe", "fake_quant", "qat")


class QuantStub(nn.Module):
    """Identity in float; the quantizer quantizes its output.

    :param scale: a fixed output scale (None: observed like any activation).
    :param dtype: ``"int8"`` or ``"int16"``.
    """

    def __init__(self, scale: float | None = None, dtype: str = "int8") -> None:
        super().__init__()
        self.scale = scale
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return f"scale={self.scale}, dtype={self.dtype}"


class DeQuantStub(nn.Module):
    """Identity in float; marks a quantized tensor going back to float."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def set_hint(module: nn.Module, **hints: Any) -> nn.Module:
    """Attach quantization hints to ``module`` (merged with earlier ones); returns it."""
    current = dict(getattr(module, HINT_ATTR, {}))
    current.update(hints)
    setattr(module, HINT_ATTR, current)
    return module


def get_hints(module: nn.Module) -> dict[str, Any]:
    """The hints attached to ``module`` (empty when none)."""
    return dict(getattr(module, HINT_ATTR, {}))


def set_mode(model: nn.Module, mode: str) -> None:
    """Switch every quantization-aware module of ``model`` to ``mode`` (see module doc)."""
    if mode not in MODES:
        raise ValueError(f"quant mode must be one of {', '.join(MODES)}, got {mode!r}")
    for m in model.modules():
        fn = getattr(m, "hat_set_mode", None)
        if callable(fn):
            fn(mode)
