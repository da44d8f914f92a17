"""Prepare a float task model for calibration / QAT: trace, fuse, place fake quant.

``prepare(model, config)`` traces ``model.forward`` with torch.fx (models are written to be
traceable; ``hatcore.quant.QuantStub``/``DeQuantStub`` mark the quantized region), fuses
Conv2d + BatchNorm2d (+ residual add) (+ ReLU/ReLU6) into :class:`QConv2d`, turns adds, concats
and standalone ReLU6 into fake-quantized modules and returns a :class:`QuantModel` that runs the
traced graph and forwards every other attribute (``compute_loss``, ``postprocess`` ...) to the
original model.

Which tensors are quantized: the QuantStub's output, and every output of a supported op whose
inputs are all quantized. Scale-preserving ops (max-pool, nearest upsample, ReLU, identity,
dropout) reuse their input's scale. A supported op reading a float tensor (after a layer kept
in float) gets an input quantizer. Anything else stays float; :func:`convert` names it.
"""

from __future__ import annotations

import fnmatch
import operator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import fx, nn
from torch.nn import functional as F

from hat_bpu.quant.fake_quant import ActFQ, QAct, QAdd, QCat, QConv2d, QScale
from hatcore.quant import DeQuantStub, QuantStub, get_hints

PASSTHROUGH_MODULES = (nn.MaxPool2d, nn.Upsample, nn.Identity, nn.Dropout, nn.ReLU)
PASSTHROUGH_FUNCS = (F.max_pool2d, F.interpolate, F.relu, torch.relu, F.dropout)
RELU_FUNCS = (F.relu, torch.relu)
ADD_FUNCS = (operator.add, torch.add)
CAT_FUNCS = (torch.cat, torch.concat)
MUL_FUNCS = (operator.mul, torch.mul)
LAYOUT_METHODS = ("reshape", "view", "permute", "flatten")  # values unchanged: scale kept
LAYOUT_FUNCS = (torch.reshape, torch.permute, torch.flatten)
DIV_FUNCS = (operator.truediv, torch.div)
Q = "_hat_q"  # container for fake-quant modules of functional ops


@dataclass
class QConfig:
    """Typed quantizer settings (the plugin turns the recipe's ``[quantize]`` into this).

    :param observer: activation observer (``hat_bpu.observers.OBSERVERS``).
    :param pow2: power-of-two scales (the march's scale policy).
    :param overrides: module-name glob → ``int8``/``int16``/``float`` (first match wins).
    :param type_overrides: module class name → ``int8``/``int16``/``float``.
    :param exact_eval: in eval, run requantizing ops in their integer form (bit-exact with the
        integer model; see :mod:`hat_bpu.intmath`).
    """

    observer: str = "minmax"
    pow2: bool = False
    overrides: dict[str, str] = field(default_factory=dict)
    type_overrides: dict[str, str] = field(default_factory=dict)
    percentile: float = 99.99
    averaging_constant: float = 0.1
    qat_averaging: float = 0.01
    lsq: bool = False
    exact_eval: bool = True

    def fq(self, dtype: str = "int8", fixed_scale: float | None = None) -> ActFQ:
        return ActFQ(dtype, self.observer, self.pow2, fixed_scale, self.qat_averaging, self.lsq,
                     self.percentile, self.averaging_constant)


class HatTracer(fx.Tracer):
    """Keeps QuantStub/DeQuantStub, float-kept modules and their ancestors' leaves as leaves."""

    def __init__(self, float_names: set[str]) -> None:
        super().__init__()
        self.float_names = float_names

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (QuantStub, DeQuantStub)) or qualname in self.float_names:
            return True
        return super().is_leaf_module(m, qualname)


def _glob_dtype(name: str, config: QConfig) -> str | None:
    """The first ``overrides`` glob matching ``name`` (functional ops: ``_hat_q.add_1``)."""
    for pattern, value in config.overrides.items():
        if fnmatch.fnmatchcase(name, pattern):
            return value
    return None


def module_dtype(model: nn.Module, name: str, config: QConfig) -> str:
    """``int8``/``int16``/``float`` for module ``name``: recipe overrides, then model hints."""
    mod = model.get_submodule(name) if name else model
    value = _glob_dtype(name, config)
    if value is not None:
        return value
    if type(mod).__name__ in config.type_overrides:
        return config.type_overrides[type(mod).__name__]
    parts = name.split(".") if name else []
    for i in range(len(parts), -1, -1):  # the module's own hints, then its ancestors'
        hints = get_hints(model.get_submodule(".".join(parts[:i])) if i else model)
        if hints.get("float"):
            return "float"
        if "out_dtype" in hints:
            return str(hints["out_dtype"])
    return "int8"


def _float_names(model: nn.Module, config: QConfig) -> set[str]:
    names = set()
    for name, _ in model.named_modules():
        if name and module_dtype(model, name, config) == "float":
            names.add(name)
    return names


def _act_of(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """``relu``/``relu6`` when ``node`` is that activation, else None."""
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        if isinstance(m, nn.ReLU):
            return "relu"
        if isinstance(m, nn.ReLU6) or (isinstance(m, nn.Hardtanh) and m.min_val == 0
                                        and m.max_val == 6):
            return "relu6"
    if node.op == "call_function":
        if node.target in RELU_FUNCS:
            return "relu"
        if node.target is F.relu6:
            return "relu6"
    if node.op == "call_method" and node.target == "relu":
        return "relu"
    return None


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in ADD_FUNCS:
        return len(node.args) == 2 and all(isinstance(a, fx.Node) for a in node.args)
    if node.op == "call_method" and node.target == "add":
        return len(node.args) == 2 and isinstance(node.args[1], fx.Node)
    return False


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def fuse(gm: fx.GraphModule, float_names: set[str], config: QConfig, model: nn.Module) -> None:
    """Replace conv → bn → (add) → (relu) chains by :class:`QConv2d` modules, in place.

    A conv called at several places (a head shared across pyramid levels, each level with its
    own BN) becomes one fused module per call, ``name`` then ``name@1``, ``name@2`` ...: they
    share the conv's weight; each has its BN, activation and output scale.
    """
    erased: set[fx.Node] = set()
    sites: dict[str, int] = {}
    for node in list(gm.graph.nodes):
        if node in erased or node.op != "call_module" or node.target in float_names:
            continue
        name = str(node.target)
        conv = gm.get_submodule(name)
        if isinstance(conv, QConv2d):
            conv = conv.conv
        elif type(conv) is not nn.Conv2d or conv.padding_mode != "zeros":
            continue
        chain, res, act = [node], None, "none"
        bn: nn.BatchNorm2d | None = None
        nxt = _only_user(node)
        if nxt is not None and nxt.op == "call_module" and nxt.target not in float_names \
                and type(gm.get_submodule(str(nxt.target))) is nn.BatchNorm2d:
            bn = cast(nn.BatchNorm2d, gm.get_submodule(str(nxt.target)))
            chain.append(nxt)
            nxt = _only_user(nxt)
        if nxt is not None and _is_add(nxt):
            res = nxt.args[1] if nxt.args[0] is chain[-1] else nxt.args[0]
            chain.append(nxt)
            nxt = _only_user(nxt)
        if nxt is not None and _act_of(gm, nxt) is not None and str(nxt.target) not in float_names:
            act = str(_act_of(gm, nxt))
            chain.append(nxt)
        site = sites.get(name, 0)
        sites[name] = site + 1
        target = name if site == 0 else f"{name}@{site}"
        dtype = module_dtype(model, name, config)
        out_fq = None if dtype == "float" else config.fq(dtype)
        gm.add_submodule(target, QConv2d(conv, bn, act, res is not None, out_fq, config.pow2,
                                         config.exact_eval))
        with gm.graph.inserting_before(chain[-1]):
            args = (node.args[0],) if res is None else (node.args[0], res)
            new = gm.graph.call_module(target, args)
        chain[-1].replace_all_uses_with(new)
        for n in reversed(chain):
            gm.graph.erase_node(n)
            erased.add(n)
        if bn is not None:
            bn_name = str(chain[1].target)
            if not any(n.op == "call_module" and n.target == bn_name for n in gm.graph.nodes):
                gm.delete_submodule(bn_name)
    gm.graph.lint()
    gm.recompile()


class QuantModel(nn.Module):
    """The prepared model: runs the traced, fake-quantized graph; delegates other attributes.

    ``compute_loss``/``postprocess`` and any other attribute not found here come from the original
    float model (kept unregistered, so the state_dict holds only the graph's tensors).
    """

    def __init__(self, graph_module: fx.GraphModule, original: nn.Module,
                 freeze_bn_epoch: int | None = None, freeze_observer_epoch: int | None = None
                 ) -> None:
        super().__init__()
        self.qgraph = graph_module
        object.__setattr__(self, "_hat_original", original)
        self.freeze_bn_epoch, self.freeze_observer_epoch = freeze_bn_epoch, freeze_observer_epoch

    def apply_freezes(self, epoch: int) -> list[str]:
        """Freeze BN statistics / activation ranges when ``epoch`` has reached their epoch."""
        done = []
        if self.freeze_bn_epoch is not None and epoch >= self.freeze_bn_epoch:
            for m in self.modules():
                if isinstance(m, QConv2d) and not m.bn_frozen:
                    m.freeze_bn()
            done.append("bn")
        if self.freeze_observer_epoch is not None and epoch >= self.freeze_observer_epoch:
            for m in self.modules():
                if isinstance(m, ActFQ):
                    m.observer_frozen = True
            done.append("observer")
        return done

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Load, then re-apply the freezes due from the start (``freeze_*_epoch = 0``): a QAT
        model loading the calibration checkpoint starts frozen as asked; a resumed one keeps the
        freezes saved with it."""
        result = super().load_state_dict(state_dict, strict, assign)
        self.apply_freezes(0)
        if self.training:
            self.train(True)  # frozen BN back to eval
        return result

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.qgraph(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_hat_original"), name)

    def train(self, mode: bool = True) -> QuantModel:
        self._hat_original.train(mode)  # first: it shares modules whose mode the graph decides
        super().train(mode)
        return self

    def _apply(self, fn: Any, recurse: bool = True) -> QuantModel:  # .to(), .cuda(), .float()
        self._hat_original._apply(fn)
        return super()._apply(fn)

    def hat_set_mode(self, mode: str) -> None:
        """Nothing of its own: ``hatcore.quant.set_mode`` reaches every fake-quant module."""

    def float_model(self) -> nn.Module:
        """The original float model (its weights are shared where not fused)."""
        return self._hat_original


def _insert(gm: fx.GraphModule, node: fx.Node, name: str, module: nn.Module,
            args: tuple[Any, ...]) -> fx.Node:
    gm.add_submodule(name, module)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(name, args)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


def place_fake_quant(gm: fx.GraphModule, config: QConfig, model: nn.Module) -> dict[str, Any]:
    """Give every quantized tensor a quantizer; returns ``{node name: ActFQ | None}``."""
    qsrc: dict[fx.Node, ActFQ | None] = {}  # node → the quantizer defining its scale (None: float)

    def quantized_input(user: fx.Node, arg: Any) -> fx.Node:
        """``arg`` as a quantized tensor; inserts an input quantizer when it is float."""
        if not isinstance(arg, fx.Node) or qsrc.get(arg) is not None:
            return arg
        fq = config.fq()
        with gm.graph.inserting_before(user):
            name = f"{Q}.{user.name}_in{user.all_input_nodes.index(arg)}"
            gm.add_submodule(name, fq)
            new = gm.graph.call_module(name, (arg,))
        qsrc[new] = fq
        user.replace_input_with(arg, new)
        return new

    const: set[fx.Node] = set()  # computed from parameters only (no input upstream)
    for node in list(gm.graph.nodes):
        if node.op in ("placeholder", "output", "get_attr"):
            qsrc[node] = None
            if node.op == "get_attr":
                const.add(node)
            continue
        mod = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        tensor_args = [a for a in node.all_input_nodes]
        any_q = any(qsrc.get(a) is not None for a in tensor_args)
        if tensor_args and all(a in const for a in tensor_args):
            const.add(node)
        scaled = _scaled_by_const(node, qsrc, const)
        if isinstance(mod, QuantStub):
            fq = config.fq(mod.dtype, mod.scale)
            qsrc[_insert(gm, node, str(node.target), fq, node.args)] = fq
        elif isinstance(mod, DeQuantStub):
            qsrc[node] = None
        elif isinstance(mod, QConv2d):
            if mod.out_fq is None:
                qsrc[node] = None
                continue
            x = quantized_input(node, node.args[0])
            res = quantized_input(node, node.args[1]) if len(node.args) > 1 else None
            site = int(node.kwargs.get("site", 0))
            for fqs, value in ((mod.in_fq, x), (mod.res_fq, res)):
                fqs += [None] * (site + 1 - len(fqs))
                fqs[site] = qsrc.get(value) if value is not None else None
            qsrc[node] = mod.out_fq
        elif not any_q:
            qsrc[node] = None
        elif _keeps_scale(node, mod) and not _float(gm, node, model, config):
            qsrc[node] = qsrc[node.args[0]] if isinstance(node.args[0], fx.Node) else None
        elif _glob_dtype(f"{Q}.{node.name}", config) == "float" and (
                scaled is not None or _is_add(node) or _act_of(gm, node) == "relu6"
                or node.op == "call_function" and node.target in CAT_FUNCS):
            qsrc[node] = None  # a functional op kept in float by an override
        elif scaled is not None:
            x, c, divide = scaled
            fq = config.fq(_glob_dtype(f"{Q}.{node.name}", config) or _wider([qsrc[x]]))
            args = (x,) if not isinstance(c, fx.Node) else (x, c)
            scaler = QScale(fq, None if isinstance(c, fx.Node) else float(c), divide,
                            config.exact_eval)
            scaler.in_fqs = [qsrc[x]]
            qsrc[_insert(gm, node, f"{Q}.{node.name}", scaler, args)] = fq
        elif _is_add(node) or (node.op == "call_function" and node.target in CAT_FUNCS) or (
                _act_of(gm, node) == "relu6"):
            fq = config.fq(_glob_dtype(f"{Q}.{node.name}", config)
                           or _wider([qsrc.get(a) for a in node.all_input_nodes]))
            name = f"{Q}.{node.name}"
            module: QAdd | QAct | QCat
            if _is_add(node):
                module = QAdd(fq, exact=config.exact_eval)
                new = _insert(gm, node, name, module, tuple(node.args))
            elif _act_of(gm, node) == "relu6":
                module = QAct(fq, "relu6", exact=config.exact_eval)
                new = _insert(gm, node, name, module, (node.args[0],))
            else:
                dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
                module = QCat(fq, int(dim), exact=config.exact_eval)
                new = _insert(gm, node, name, module, tuple(node.args[0]))
            for a in list(new.all_input_nodes):
                quantized_input(new, a)
            module.in_fqs = [qsrc.get(a) for a in new.args]  # type: ignore[arg-type]
            qsrc[new] = fq
        else:
            qsrc[node] = None  # unsupported here: stays float; convert() reports it
    gm.graph.lint()
    gm.recompile()
    return {n.name: q for n, q in qsrc.items()}


def _keeps_scale(node: fx.Node, mod: nn.Module | None) -> bool:
    """Ops exact on integers, whose output reuses the input's scale: max-pool, nearest
    upsample, ReLU, identity, dropout, contiguous and layout changes (reshape, permute ...)."""
    if mod is not None:
        return isinstance(mod, PASSTHROUGH_MODULES) and (
            not isinstance(mod, nn.Upsample) or mod.mode == "nearest")
    if node.op == "call_function":
        return (node.target in PASSTHROUGH_FUNCS and node.kwargs.get("mode", "nearest") == "nearest"
                ) or node.target in LAYOUT_FUNCS
    return node.op == "call_method" and node.target in ("relu", "contiguous") + LAYOUT_METHODS


def _wider(fqs: list[Any]) -> str:
    """int16 when any input is int16 (a functional op keeps its inputs' precision), else int8."""
    return "int16" if any(getattr(q, "dtype", None) == "int16" for q in fqs) else "int8"


def _scaled_by_const(node: fx.Node, qsrc: dict[fx.Node, Any], const: set[fx.Node]
                     ) -> tuple[fx.Node, Any, bool] | None:
    """``(x, c, divide)`` when ``node`` is a quantized ``x * c`` / ``c * x`` / ``x / c``."""
    is_mul = (node.op == "call_function" and node.target in MUL_FUNCS) or (
        node.op == "call_method" and node.target == "mul")
    is_div = (node.op == "call_function" and node.target in DIV_FUNCS) or (
        node.op == "call_method" and node.target == "div")
    if not (is_mul or is_div) or len(node.args) != 2 or node.kwargs:
        return None

    def q(a: Any) -> bool:
        return isinstance(a, fx.Node) and qsrc.get(a) is not None

    def c(a: Any) -> bool:
        return isinstance(a, (int, float)) and a != 0 or isinstance(a, fx.Node) and a in const

    a, b = node.args
    if isinstance(a, fx.Node) and q(a) and c(b):
        return a, b, is_div
    if is_mul and isinstance(b, fx.Node) and q(b) and c(a):
        return b, a, False
    return None


def _float(gm: fx.GraphModule, node: fx.Node, model: nn.Module, config: QConfig) -> bool:
    return node.op == "call_module" and module_dtype(model, str(node.target), config) == "float"


def prepare(model: nn.Module, config: QConfig) -> QuantModel:
    """Trace, fuse and fake-quantize ``model`` (eval mode; its weights are shared, not copied).

    :param model: a traceable float task model with a QuantStub at its input.
    :returns: the prepared model in ``float`` mode (call ``hatcore.quant.set_mode``).
    """
    float_names = _float_names(model, config)
    tracer = HatTracer(float_names)
    graph = tracer.trace(model)
    gm = fx.GraphModule(model, graph, type(model).__name__ + "Quant")
    if not any(n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), QuantStub)
               for n in gm.graph.nodes):
        raise ValueError(f"{type(model).__name__} has no hatcore.quant.QuantStub: mark where the "
                         "quantized part begins")
    fuse(gm, float_names, config, model)
    place_fake_quant(gm, config, model)
    qm = QuantModel(gm, model)
    return qm.train(model.training)
