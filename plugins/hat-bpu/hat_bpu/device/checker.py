"""The model checker: can this float model run on a march's BPU? (``hat check``, ``check_model``).

The model is traced with torch.fx (QuantStub/DeQuantStub kept as leaves) and run once on the
example input to record shapes. Every op between a QuantStub and a DeQuantStub is listed as
``BPU`` or ``NOT SUPPORTED`` with the reason (op type, kernel, stride, channels, tensor size),
against the limits in :mod:`hat_bpu.device.march`. Ops outside that region run on the host (float).

Rules that need the quantization scales run on the integer graph once it exists
(:func:`check_scales`, at export): an add whose int32 intermediate can overflow.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.nn import functional as F

from hat_bpu.device.march import March
from hat_bpu.ir import graph as ir
from hat_bpu.quant import qspec
from hatcore.quant import DeQuantStub, QuantStub

_NOOP_MODULES = (nn.Identity, nn.Dropout)
_RELU = (nn.ReLU, nn.ReLU6)
_RELU_FUNCS = (F.relu, torch.relu, F.relu6)
_ADD = (operator.add, operator.iadd, torch.add)
_SCALE = (operator.mul, operator.truediv, torch.mul)
_LAYOUT_METHODS = ("reshape", "view", "permute", "flatten", "contiguous", "relu")
_LAYOUT_FUNCS = (torch.reshape, torch.permute, torch.flatten)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (QuantStub, DeQuantStub)) or super().is_leaf_module(m, qualname)


class _Shapes(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            n.meta["hat_check_shape"] = list(out.shape)
        return out


@dataclass
class OpReport:
    """One op of the quantized region."""

    name: str
    op: str
    shape: list[int] | None
    ok: bool
    reason: str


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _conv(mod: nn.Conv2d, march: March) -> list[str]:
    bad = []
    k, s, d = _pair(mod.kernel_size), _pair(mod.stride), _pair(mod.dilation)
    if max(k) > march.max_kernel:
        bad.append(f"kernel {k[0]}x{k[1]} > {march.max_kernel}")
    if max(s) > march.max_stride:
        bad.append(f"stride {s} > {march.max_stride}")
    if max(mod.in_channels, mod.out_channels) > march.max_channels:
        bad.append(f"channels {mod.in_channels}->{mod.out_channels} > {march.max_channels}")
    if mod.padding_mode != "zeros":
        bad.append(f"padding_mode {mod.padding_mode!r} (only zeros)")
    if isinstance(mod.padding, str) and mod.padding != "valid" and max(s) > 1:
        bad.append(f"padding {mod.padding!r} with stride {s}")
    if max(d) > 1 and max(k) > 1 and march.name == "bernoulli2":
        bad.append(f"dilation {d} (bernoulli2 has no dilated conv)")
    return bad


def _classify(node: fx.Node, mod: nn.Module | None, march: March) -> tuple[str, list[str]]:
    """(op description, reasons it is not supported — empty when it runs on the BPU)."""
    t = node.target
    if mod is not None:
        kind = type(mod).__name__
        if isinstance(mod, nn.Conv2d):
            return f"Conv2d {mod.in_channels}->{mod.out_channels} k{_pair(mod.kernel_size)[0]}" \
                   f" s{_pair(mod.stride)[0]} g{mod.groups}", _conv(mod, march)
        if isinstance(mod, nn.BatchNorm2d):
            src = node.args[0]
            ok = isinstance(src, fx.Node) and src.op == "call_module"
            return kind, [] if ok else ["BatchNorm2d not directly after a conv cannot be folded"]
        if isinstance(mod, (*_RELU, *_NOOP_MODULES)):
            return kind, []
        if isinstance(mod, nn.MaxPool2d):
            k = _pair(mod.kernel_size)
            bad = [f"kernel {k} > {march.max_kernel}"] if max(k) > march.max_kernel else []
            if _pair(mod.dilation) != (1, 1):
                bad.append("dilated max-pool")
            return kind, bad
        if isinstance(mod, nn.Upsample):
            return kind, [] if mod.mode == "nearest" else [f"upsample mode {mod.mode!r} "
                                                           "(only nearest)"]
        return kind, [f"op type {kind} has no BPU kernel on {march.name}"]
    if node.op == "call_function":
        name = getattr(t, "__name__", str(t))
        if t in _RELU_FUNCS or t in _ADD or t in _LAYOUT_FUNCS or t is torch.cat:
            return name, []
        if t in _SCALE:
            tensors = [a for a in node.args if isinstance(a, fx.Node)
                       and "hat_check_shape" in a.meta and a.meta["hat_check_shape"]]
            return name, [] if len(tensors) <= 1 else [f"{name} of two tensors (only by a "
                                                       "constant)"]
        if t is F.max_pool2d:
            return name, []
        if t is F.interpolate:
            mode = node.kwargs.get("mode", "nearest")
            return name, [] if mode == "nearest" else [f"interpolate mode {mode!r} (only nearest)"]
        return name, [f"op type {name} has no BPU kernel on {march.name}"]
    if node.op == "call_method":
        return f".{t}()", [] if t in _LAYOUT_METHODS else [f"method .{t}() has no BPU kernel"]
    return node.op, []


def check(model: nn.Module, march: March, example_input: torch.Tensor) -> dict[str, Any]:
    """Check ``model`` against ``march``; returns ``{"ok", "text", "ops": [OpReport dicts]}``.

    :param example_input: ``Tensor[1, 3, H, W]`` of the deployed shape.
    """
    try:
        gm = fx.GraphModule(model, _Tracer().trace(model))
        with torch.no_grad():
            _Shapes(gm).run(example_input)
    except Exception as exc:  # tracing errors of arbitrary models
        text = f"cannot trace {type(model).__name__} with torch.fx: {exc}"
        return {"ok": False, "text": text, "ops": []}
    region: set[fx.Node] = set()
    reports: list[OpReport] = []
    stubs = 0
    for node in gm.graph.nodes:
        mod = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        if isinstance(mod, QuantStub):
            region.add(node)
            stubs += 1
            continue
        if isinstance(mod, DeQuantStub) or not node.op.startswith("call"):
            continue
        if not any(a in region for a in node.all_input_nodes):
            continue
        shape = node.meta.get("hat_check_shape")
        if shape is None:
            continue  # shape arithmetic (x.shape, getitem): folded into attributes
        region.add(node)
        desc, bad = _classify(node, mod, march)
        nbytes = int(torch.Size(shape).numel()) // max(1, shape[0])
        if nbytes > march.max_tensor_bytes:
            bad = [*bad, f"tensor {shape} is {nbytes} B > {march.max_tensor_bytes} B"]
        reports.append(OpReport(node.name, desc, shape, not bad, "; ".join(bad)))
    failed = [r for r in reports if not r.ok]
    lines = [f"model checker: march {march.name} ({march.device}), input "
             f"{list(example_input.shape)}"]
    if stubs == 0:
        lines.append("NOT SUPPORTED: no QuantStub in the model: nothing would run on the BPU")
    for r in reports:
        status = "BPU" if r.ok else "NOT SUPPORTED"
        lines.append(f"  {r.name:32s} {r.op:32s} {str(r.shape):22s} {status}"
                     + (f"  ({r.reason})" if r.reason else ""))
    ok = stubs > 0 and not failed
    lines.append(f"{len(reports) - len(failed)}/{len(reports)} ops on the BPU: "
                 + ("deployable" if ok else f"{len(failed)} not supported"))
    return {"ok": ok, "text": "\n".join(lines), "march": march.name,
            "ops": [vars(r) for r in reports]}


def check_scales(graph: ir.Graph, march: March) -> list[str]:
    """The rules of ``march`` that depend on the scales of the integer ``graph``: one reason per
    node it cannot run (empty: it can).

    * ``add``: the march's int32 intermediate ``Σ x_i · a_i`` (docs/bpu.md, "add") must hold
      every input in its dtype's range. On bernoulli2 an int16 add whose input scales differ by
      more than ~500× cannot (``a_i ≈ s_i / s_int`` with ``s_int ≥ s_feature / 127``); what the
      device does then is not in Horizon's public sources, so the add is refused rather than
      guessed.
    """
    problems = []
    for n in graph.nodes:
        if n.op != "add":
            continue
        ins = [graph.tensors[i] for i in n.inputs]
        scales, dtypes = [float(t.scale) for t in ins], [t.dtype for t in ins]
        peak = qspec.add_int32_peak(scales, dtypes, march.name)
        if peak is not None and peak >= 2**31:
            problems.append(
                f"{n.name}: {'/'.join(dtypes)} add with input scales "
                f"{', '.join(f'{s:.3g}' for s in scales)} overflows the int32 intermediate of "
                f"{march.name}'s add (up to {peak:.3g} >= 2^31); bring the inputs' ranges "
                "closer (a smaller ratio of scales) or quantize them int8")
    return problems
