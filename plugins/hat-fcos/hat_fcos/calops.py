"""Count the operations and parameters of any model, per layer (``hat calops``).

Every aten op of one forward pass is counted and charged to the innermost module running it:
matmul/conv ops by ``torch.utils.flop_counter``'s formulas (FLOPs = 2 x MACs), every other op
(add, ReLU, BN, pooling, resize ...) as one op per output element. Forward only: the flop
counter's backward formulas overcount grouped (depthwise) convs by the group count.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

_FREE = {"view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "detach",
         "alias", "as_strided", "slice", "select", "unsqueeze", "squeeze", "split",
         "split_with_sizes", "unbind", "clone", "contiguous", "_to_copy", "empty_like",
         "lift_fresh", "_reshape_alias", "flatten", "cat"}


@dataclass
class LayerOps:
    name: str
    kind: str
    params: int = 0
    macs: int = 0           # multiply-accumulates of conv/matmul ops
    other_ops: int = 0      # elementwise and other ops (one per output element)
    ops_by_type: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    @property
    def flops(self) -> int:
        return 2 * self.macs + self.other_ops


@dataclass
class OpsReport:
    layers: list[LayerOps]
    input_shape: tuple[int, ...]

    @property
    def total_macs(self) -> int:
        return sum(la.macs for la in self.layers)

    @property
    def total_flops(self) -> int:
        return sum(la.flops for la in self.layers)

    @property
    def total_params(self) -> int:
        return sum(la.params for la in self.layers)

    def table(self, top: int | None = None) -> str:
        """The per-layer table (largest first when ``top`` is given) and the totals."""
        rows = [la for la in self.layers if la.flops or la.params]
        if top is not None:
            rows = sorted(rows, key=lambda la: -la.flops)[:top]
        width = max([len(la.name) for la in rows] + [5])
        lines = [f"{'layer':<{width}}  {'type':<14} {'params':>10} {'MFLOPs':>10} {'MMACs':>10}"
                 "  ops"]
        for la in rows:
            ops = ", ".join(f"{k}" for k in sorted(la.ops_by_type))
            lines.append(f"{la.name:<{width}}  {la.kind:<14} {la.params:>10,} "
                         f"{la.flops / 1e6:>10.3f} {la.macs / 1e6:>10.3f}  {ops}")
        lines.append(f"input {list(self.input_shape)}: {self.total_flops / 1e9:.3f} GFLOPs, "
                     f"{self.total_macs / 1e9:.3f} GMACs, {self.total_params / 1e6:.3f} M params")
        return "\n".join(lines)


class _Counter(TorchDispatchMode):
    def __init__(self, stack: list[str], layers: dict[str, LayerOps]) -> None:
        super().__init__()
        self.stack, self.layers = stack, layers

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        layer = self.layers[self.stack[-1]]
        name = packet.__name__.rstrip("_")
        if packet in flop_registry:
            layer.macs += flop_registry[packet](*args, **kwargs, out_val=out) // 2
            layer.ops_by_type[name] += 1
        elif name not in _FREE:
            outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            n = sum(t.numel() for t in outs[:1])
            if n:
                layer.other_ops += n
                layer.ops_by_type[name] += 1
        return out


def _pop(stack: list[str]) -> None:
    stack.pop()


def count_ops(model: nn.Module, input_shape: tuple[int, ...] | list[int]) -> OpsReport:
    """Run one forward pass of ``model`` on zeros of ``input_shape`` (eval mode, no grad)
    and count ops and parameters per module (the innermost module running each op).
    """
    layers: dict[str, LayerOps] = {}
    stack: list[str] = ["(model)"]
    handles = []
    for name, mod in model.named_modules():
        key = name or "(model)"
        own = sum(p.numel() for p in mod.parameters(recurse=False))
        layers[key] = LayerOps(key, type(mod).__name__, own)
        if name:
            handles.append(mod.register_forward_pre_hook(
                lambda _m, _i, k=key: stack.append(k)))
            handles.append(mod.register_forward_hook(lambda _m, _i, _o: _pop(stack)))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x = torch.zeros(tuple(input_shape), device=device)
    try:
        with torch.no_grad(), _Counter(stack, layers):
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return OpsReport(list(layers.values()), tuple(input_shape))
