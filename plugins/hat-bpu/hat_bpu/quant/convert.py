"""Integer conversion: a prepared (calibrated / QAT) model → :class:`hat_bpu.ir.Graph`.

BN is folded, weights become int8 per output channel, biases int32 at ``s_in * s_w``, and every
requantization an integer multiplier and shift (:mod:`hat_bpu.quant.qspec`). The values are computed
with the same float32 torch expressions the fake-quant forward uses, so both sides hold the
same integers.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from torch import fx, nn
from torch.nn import functional as F
from torch.utils import _pytree as pytree

from hat_bpu.ir import graph as ir
from hat_bpu.quant import qspec
from hat_bpu.quant.fake_quant import ActFQ, QAct, QAdd, QCat, QConv2d, QScale
from hat_bpu.quant.intmath import conv_params
from hat_bpu.quant.prepare import LAYOUT_FUNCS, LAYOUT_METHODS, RELU_FUNCS, QuantModel
from hatcore import quant
from hatcore.errors import UserError
from hatcore.quant import DeQuantStub

IR_VERSION = 1


def _pair(v: Any) -> list[int]:
    return [int(v), int(v)] if isinstance(v, (int, float)) else [int(x) for x in v]


class _Converter:
    def __init__(self, gm: fx.GraphModule, meta: dict[str, Any]) -> None:
        self.gm = gm
        self.tensors: dict[str, ir.Tensor] = {}
        self.nodes: list[ir.Node] = []
        self.names: dict[fx.Node, str] = {}
        self.meta = meta

    def tensor(self, node: fx.Node, dtype: str, scale: float | None) -> str:
        shape = list(node.meta["hat_shape"])
        self.tensors[node.name] = ir.Tensor(node.name, shape, dtype, scale)
        self.names[node] = node.name
        return node.name

    def src(self, node: fx.Node, arg: Any) -> ir.Tensor:
        if not isinstance(arg, fx.Node) or arg not in self.names:
            raise UserError(f"cannot convert {node.name!r}: its input {arg} is not a quantized tensor")
        t = self.tensors[self.names[arg]]
        if t.dtype == "float32" and node.op != "output":
            raise UserError(f"cannot convert {node.name!r} ({node.format_node()}): its input "
                            f"{t.name!r} is float (a layer kept in float cannot be deployed)")
        return t

    def add(self, op: str, node: fx.Node, inputs: list[ir.Tensor], dtype: str, scale: float | None,
            name: str | None = None, attrs: dict[str, Any] | None = None,
            params: dict[str, np.ndarray] | None = None) -> None:
        out = self.tensor(node, dtype, scale)
        self.nodes.append(ir.Node(op, name or node.name, [t.name for t in inputs], [out],
                                  attrs or {}, params or {}))

    def alias(self, node: fx.Node, arg: fx.Node) -> None:
        self.names[node] = self.names[arg]

    def run(self) -> ir.Graph:
        inputs: list[str] = []
        outputs: list[str] = []
        const: set[fx.Node] = set()  # computed from parameters only: folded into multipliers
        for node in self.gm.graph.nodes:
            mod = self.gm.get_submodule(str(node.target)) if node.op == "call_module" else None
            if node.op == "get_attr" or (node.op.startswith("call") and node.all_input_nodes
                                         and all(a in const for a in node.all_input_nodes)):
                const.add(node)
            elif node.op.startswith("call") and "hat_shape" not in node.meta:
                pass  # not a tensor: shape arithmetic (x.shape[-2:]), folded into attributes
            elif node.op == "placeholder":
                inputs.append(self.tensor(node, "float32", None))
            elif node.op == "output":
                leaves, tree = pytree.tree_flatten(node.args[0])
                for leaf in leaves:
                    t = self.src(node, leaf)
                    if t.dtype != "float32":
                        raise UserError(f"model output {t.name!r} is not dequantized: end the "
                                        "quantized part with hatcore.quant.DeQuantStub")
                    outputs.append(t.name)
                self.meta["output_tree"] = pytree.treespec_dumps(tree)
            elif isinstance(mod, ActFQ):
                x = node.args[0]
                if not (isinstance(x, fx.Node) and x.op == "placeholder"):
                    raise UserError(f"cannot convert {node.name!r}: it quantizes a float tensor "
                                    "computed inside the model (a layer kept in float?)")
                self.add("quantize", node, [self.tensors[self.names[x]]], mod.dtype,
                         float(mod.scale), name=str(node.target))
            elif isinstance(mod, DeQuantStub):
                x = self.src(node, node.args[0])
                self.add("dequantize", node, [x], "float32", None)
            elif isinstance(mod, QConv2d):
                self.conv(node, mod)
            elif isinstance(mod, QScale):
                self.scale_op(node, mod)
            elif isinstance(mod, (QAdd, QCat, QAct)):
                self.requant_op(node, mod)
            elif self.passthrough(node, mod):
                pass
            else:
                raise UserError(f"cannot convert {node.name!r} ({node.format_node()}): a layer "
                                "kept in float (override / hint) or not a supported integer op "
                                "(conv2d+bn+relu/relu6, add, cat, max-pool, nearest upsample, relu)")
        return ir.Graph(self.tensors, self.nodes, inputs, outputs, self.meta)

    def conv(self, node: fx.Node, mod: QConv2d) -> None:
        if mod.out_fq is None:
            raise UserError(f"cannot convert {node.target!r}: it is kept in float (override or "
                            "hint); remove that for export")
        x = self.src(node, node.args[0])
        res = self.src(node, node.args[1]) if len(node.args) > 1 else None
        s_out, dtype = float(mod.out_fq.scale), mod.out_fq.dtype
        c = mod.conv
        w, b = mod.folded()
        params = conv_params(w, b, mod.pow2, float(x.scale), s_out,
                             None if res is None else float(res.scale))
        attrs = {"stride": _pair(c.stride), "padding": _pair(c.padding),
                 "dilation": _pair(c.dilation), "groups": int(c.groups), "act": mod.act,
                 "clip": list(qspec.act_clip(mod.act, s_out, dtype) or []) or None}
        inputs = [x] if res is None else [x, res]
        self.add("conv2d", node, inputs, dtype, s_out, name=str(node.target), attrs=attrs,
                 params=params)
        if qspec.bias_overflows(b.detach().cpu().numpy(), float(x.scale), params["w_scale"]):
            self.meta.setdefault("bias_saturated", []).append(str(node.target))

    def scale_op(self, node: fx.Node, mod: QScale) -> None:
        x = self.src(node, node.args[0])
        c = float(node.args[1].meta["hat_value"]) if len(node.args) > 1 else float(mod.const or 0)
        s_out, dtype = float(mod.out_fq.scale), mod.out_fq.dtype
        ratio = float(x.scale) / (c * s_out) if mod.divide else c * float(x.scale) / s_out
        if ratio == 0:
            raise UserError(f"cannot convert {node.name!r}: multiplies by zero")
        m, s = qspec.requant_params(abs(ratio))
        m = m if ratio > 0 else -m  # a negative constant: a negative multiplier
        self.add("requantize", node, [x], dtype, s_out, name=str(node.target),
                 params={"m": m, "shift": s}, attrs={"act": "none", "clip": None})

    def requant_op(self, node: fx.Node, mod: QAdd | QCat | QAct) -> None:
        xs = [self.src(node, a) for a in node.args]
        s_out, dtype = float(mod.out_fq.scale), mod.out_fq.dtype
        ratios = [np.array([float(x.scale) / s_out]) for x in xs]
        name = str(node.target)
        if isinstance(mod, QCat):
            pairs = [qspec.requant_params(r) for r in ratios]
            axis = mod.dim if mod.dim >= 0 else mod.dim + len(xs[0].shape)
            params = {"m": np.concatenate([p[0] for p in pairs]),
                      "shift": np.concatenate([p[1] for p in pairs])}
            self.add("concat", node, xs, dtype, s_out, name, {"axis": axis}, params)
            return
        attrs = {"act": mod.act, "clip": list(qspec.act_clip(mod.act, s_out, dtype) or []) or None}
        if isinstance(mod, QAdd):
            want = self.meta.get("march")
            if mod.march is not None and want is not None and mod.march != want:
                raise UserError(f"{name!r} was quantized for march {mod.march!r}, exported for "
                                f"{want!r}: state the march once ([target] march)")
            ms, s = qspec.add_params([float(x.scale) for x in xs], s_out, mod.march)
            self.add("add", node, xs, dtype, s_out, name, attrs,
                     {"m": np.concatenate(ms), "shift": s})
        else:
            m, s = qspec.requant_params(ratios[0])
            self.add("requantize", node, xs, dtype, s_out, name, attrs, {"m": m, "shift": s})

    def passthrough(self, node: fx.Node, mod: nn.Module | None) -> bool:
        """Scale-preserving ops; True when handled."""
        if isinstance(mod, (nn.Identity, nn.Dropout)) or (
                node.op == "call_method" and node.target == "contiguous") or (
                node.op == "call_function" and node.target is F.dropout):
            self.alias(node, node.args[0])
            return True
        x = self.src(node, node.args[0]) if node.args else None
        if x is None:
            return False
        if (node.op == "call_method" and node.target in LAYOUT_METHODS) or (
                node.op == "call_function" and node.target in LAYOUT_FUNCS):
            out_shape = list(node.meta["hat_shape"])
            perm = _permutation(node)
            if perm is not None:
                self.add("permute", node, [x], x.dtype, x.scale, attrs={"dims": perm})
            else:
                self.add("reshape", node, [x], x.dtype, x.scale, attrs={"shape": out_shape[1:]})
            return True
        if isinstance(mod, nn.ReLU) or (node.op == "call_function" and node.target in RELU_FUNCS) \
                or (node.op == "call_method" and node.target == "relu"):
            self.add("relu", node, [x], x.dtype, x.scale)
            return True
        if isinstance(mod, nn.MaxPool2d) or (node.op == "call_function"
                                             and node.target is F.max_pool2d):
            if mod is not None:
                k, s, p, d, ceil = (mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                                    mod.ceil_mode)
            else:
                kw = dict(zip(["kernel_size", "stride", "padding", "dilation", "ceil_mode"],
                              node.args[1:], strict=False)) | dict(node.kwargs)
                k = kw["kernel_size"]
                s = kw.get("stride") or k
                p, d, ceil = kw.get("padding", 0), kw.get("dilation", 1), kw.get("ceil_mode", False)
            if _pair(d) != [1, 1]:
                return False
            self.add("maxpool", node, [x], x.dtype, x.scale, attrs={
                "kernel": _pair(k), "stride": _pair(s), "padding": _pair(p),
                "ceil_mode": bool(ceil)})
            return True
        if isinstance(mod, nn.Upsample) or (node.op == "call_function"
                                            and node.target is F.interpolate):
            shape_in = x.shape
            shape_out = list(node.meta["hat_shape"])
            fh, fw = shape_out[2] // shape_in[2], shape_out[3] // shape_in[3]
            if [fh * shape_in[2], fw * shape_in[3]] != shape_out[2:]:
                return False
            self.add("upsample_nearest", node, [x], x.dtype, x.scale, attrs={"scale": [fh, fw]})
            return True
        return False


def _permutation(node: fx.Node) -> list[int] | None:
    """The dims of a permute node (None for reshape/view/flatten)."""
    if node.target not in ("permute", torch.permute):
        return None
    dims = node.args[1:] if node.op == "call_method" else node.args[1]
    if node.op == "call_method" and len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = dims[0]
    return [int(d) for d in dims]  # type: ignore[union-attr]


class _Record(fx.Interpreter):
    """Runs the graph once, noting every value's shape (``hat_shape``) and small constants'
    values (``hat_value``) in ``node.meta``."""

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        n.meta.pop("hat_shape", None)
        if isinstance(result, torch.Tensor):
            n.meta["hat_shape"] = list(result.shape)
            if result.numel() == 1:
                n.meta["hat_value"] = float(result)
        return result


def convert(model: nn.Module, example_input: torch.Tensor, march: str | None = None) -> ir.Graph:
    """The integer graph of a prepared model (as returned by the ``quantize`` hook).

    :param model: a :class:`hat_bpu.quant.prepare.QuantModel`, calibrated or QAT-trained.
    :param example_input: ``Tensor[1, 3, H, W]`` of the deployed shape (shapes are recorded).
    :param march: recorded in ``graph.meta``.
    :raises UserError: a layer kept in float, an unsupported op in the quantized part, an output
        that is not dequantized.
    """
    if not isinstance(model, QuantModel):
        raise UserError("convert needs a model prepared by the hat-bpu quantizer "
                        f"(got {type(model).__name__})")
    gm = model.qgraph
    was_training = model.training
    model.eval()
    quant.set_mode(model, "fake_quant")
    try:
        with torch.no_grad():
            _Record(gm).run(example_input.to(next(model.parameters()).device))
        pow2 = any(getattr(m, "pow2", False) for m in gm.modules())
        graph = _Converter(gm, {"version": IR_VERSION, "march": march, "pow2_scales": pow2}).run()
    finally:
        model.train(was_training)
    graph.validate()
    if graph.meta.get("bias_saturated"):
        warnings.warn(f"int32 bias saturates in {len(graph.meta['bias_saturated'])} conv(s) "
                      f"({', '.join(graph.meta['bias_saturated'][:5])} ...): their input's scale is "
                      "tiny next to the bias (a nearly dead tensor at calibration?)", stacklevel=2)
    return graph
