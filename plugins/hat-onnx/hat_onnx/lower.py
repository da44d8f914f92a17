"""The ``.hbir`` integer graph as ONNX, in two forms (docs/onnx.md).

``form="int"`` (``model.int.onnx``) — **the device's arithmetic, exactly**, in standard ONNX ops:

* activations keep their ``.hbir`` dtype (int8 / int16 tensors in the ONNX graph);
* a convolution runs as float32 ``Conv`` on the integers, which is exact because every partial
  sum is an integer of magnitude <= 2**24: the exporter proves it from the weights
  (``max_o Σ|w[o]| · max|x| <= 2**24``) and otherwise splits the input into an int8 high and
  a uint8 low digit (``x = 256·hi + lo``, int16 inputs) and the input channels into chunks,
  each an exact float32 conv, summed in int64;
* bias, multiplier and residual in int64 (``Mul``/``Add``), then the device's
  ``round_half_even(v / 2**s)`` from ``Div`` (truncating), a floor correction and the tie
  rule (``BitwiseAnd`` for odd), ``Clip`` to the activation and dtype range, ``Cast``.

``form="qdq"`` (``model.qdq.onnx``) — the form deployment stacks accept: QuantizeLinear /
DequantizeLinear around float ops (int8 and int16, opset 21). The device's integer
multiplier ``m / 2**s`` is written as the dequantize scales (``w_scale' = m/2**s · s_out/s_in``),
so each requantization is one float rounding of the same ratio; ONNX Runtime fuses int8
DQ→Conv→Q into ``QLinearConv``, whose float32 requantization scale differs from ``m/2**s``
(relative error ~2**-24 instead of < 2**-30), so a value within that distance of a rounding tie
may land 1 LSB away (measured in bench/RESULTS-onnx.md).

An op with no lowering (an ``.hbir`` written by a newer exporter) is a
:class:`UnsupportedOp` error naming the node and the op.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from hat_onnx.hbir import Hbir, Node
from hatcore.errors import UserError

OPSET = 21
IR_VERSION = 10
QRANGE = {"int8": (-128, 127), "int16": (-32768, 32767), "int32": (-(2**31), 2**31 - 1)}
ONNX_TYPE = {"int8": TensorProto.INT8, "int16": TensorProto.INT16, "int32": TensorProto.INT32,
             "int64": TensorProto.INT64, "float32": TensorProto.FLOAT,
             "float64": TensorProto.DOUBLE}
NP_TYPE = {"int8": np.int8, "int16": np.int16, "int32": np.int32}
EXACT = 2**24  # integers up to this are exact in float32, every partial sum too
FORMS = ("int", "qdq")


class UnsupportedOp(UserError):
    """An ``.hbir`` node hat-onnx cannot express in ONNX."""


class _Builder:
    def __init__(self, g: Hbir) -> None:
        self.g = g
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0
        self.where = ""

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{self.where}/{hint}_{self._n}"

    def const(self, value: Any, dtype: Any, hint: str = "c") -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], out: str | None = None, hint: str = "",
           **attrs: Any) -> str:
        out = out or self.name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=self.name(op_type),
                                           **attrs))
        return out

    def cast(self, x: str, to: str, out: str | None = None) -> str:
        return self.op("Cast", [x], out, to=ONNX_TYPE[to])


def _tensor(g: Hbir, name: str) -> Any:
    return g.tensors[name]


# --------------------------------------------------------------------------- exact integer form


def _round_shift(b: _Builder, v: str, shift: np.ndarray) -> str:
    """``round_half_even(v / 2**shift)`` on int64 ``v`` (``shift >= 0``, broadcastable)."""
    s = np.asarray(shift, np.int64)
    if np.any(s < 0) or np.any(s > 62):
        raise UnsupportedOp(f"{b.g.path}: node {b.where!r}: shift {s.ravel().tolist()} outside "
                            "0..62 (the .hbir requantization contract)")
    if not np.any(s):
        return v
    p = np.left_shift(np.int64(1), s)
    half = np.where(s > 0, np.left_shift(np.int64(1), np.maximum(s - 1, 0)), 1)
    pc = b.const(p, np.int64, "pow2")
    t = b.op("Div", [v, pc], hint="trunc")                    # toward zero
    r = b.op("Sub", [v, b.op("Mul", [t, pc])], hint="rem")  # in (-2**s, 2**s)
    neg = b.cast(b.op("Less", [r, b.const(0, np.int64)]), "int64")
    q = b.op("Sub", [t, neg], hint="floor")
    r = b.op("Add", [r, b.op("Mul", [neg, pc])], hint="rem0")  # in [0, 2**s)
    hc = b.const(half, np.int64, "half")
    odd = b.op("Equal", [b.op("BitwiseAnd", [q, b.const(1, np.int64)]), b.const(1, np.int64)])
    up = b.op("Or", [b.op("Greater", [r, hc]), b.op("And", [b.op("Equal", [r, hc]), odd])])
    return b.op("Add", [q, b.cast(up, "int64")], hint="round")


def _saturate(b: _Builder, v: str, node: Node, out: str) -> str:
    """``sat(clip(v))`` on int64 ``v``, cast to the output tensor's dtype."""
    dtype = _tensor(b.g, out).dtype
    clip = node.attrs.get("clip")
    if clip:
        v = b.op("Clip", [v, b.const(int(clip[0]), np.int64), b.const(int(clip[1]), np.int64)])
    lo, hi = QRANGE[dtype]
    v = b.op("Clip", [v, b.const(lo, np.int64), b.const(hi, np.int64)], hint="sat")
    return b.cast(v, dtype, out)


def _chunks(w_abs: np.ndarray, digit_max: int) -> list[tuple[int, int]] | None:
    """Input-channel ranges ``[a, b)`` whose conv partial sums stay exact in float32.

    ``w_abs[o, c]``: Σ over the kernel window of ``|w[o, c]|``. None: a single channel alone
    exceeds the bound (cannot be made exact by splitting channels).
    """
    ranges, start, acc = [], 0, np.zeros(w_abs.shape[0], np.int64)
    for c in range(w_abs.shape[1]):
        col = w_abs[:, c].astype(np.int64) * digit_max
        if np.any(col > EXACT):
            return None
        if np.any(acc + col > EXACT):
            ranges.append((start, c))
            start, acc = c, np.zeros_like(acc)
        acc = acc + col
    ranges.append((start, w_abs.shape[1]))
    return ranges


def _int_conv(b: _Builder, n: Node) -> None:
    g, p, a = b.g, n.params, n.attrs
    x_t = _tensor(g, n.inputs[0])
    w = p["weight"].astype(np.int64)
    groups = int(a["groups"])
    conv_attrs = {"strides": list(a["stride"]), "pads": [*a["padding"], *a["padding"]],
                  "dilations": list(a["dilation"]), "group": groups,
                  "kernel_shape": list(w.shape[2:])}
    xf = b.cast(n.inputs[0], "float32")
    if x_t.dtype == "int8":
        digits = [(xf, 128, 1)]
    elif x_t.dtype == "int16":
        hi = b.op("Floor", [b.op("Mul", [xf, b.const(1 / 256, np.float32)])], hint="hi")
        lo = b.op("Sub", [xf, b.op("Mul", [hi, b.const(256, np.float32)])], hint="lo")
        digits = [(hi, 128, 256), (lo, 255, 1)]
    else:
        raise UnsupportedOp(f"{g.path}: node {n.name!r}: conv2d input dtype {x_t.dtype!r} "
                            "(expected int8 or int16)")
    w_abs = np.abs(w).sum(axis=(2, 3))  # [O, I/groups]
    terms = []
    for x_d, dmax, weight in digits:
        ranges = _chunks(w_abs, dmax)
        if ranges is None or (groups > 1 and len(ranges) > 1):
            raise UnsupportedOp(f"{g.path}: node {n.name!r}: conv2d reduction too long to be exact "
                                "in float32 ONNX Conv (per-channel Σ|w|·|x| > 2**24)")
        for a0, a1 in ranges:
            xin = x_d
            if len(ranges) > 1:
                xin = b.op("Slice", [x_d, b.const([a0], np.int64), b.const([a1], np.int64),
                                     b.const([1], np.int64)], hint="xchunk")
            # int8 in the file; ORT folds the Cast into a float32 initializer at load
            wc = b.cast(b.const(w[:, a0:a1], np.int8, "w"), "float32")
            acc = b.cast(b.op("Conv", [xin, wc], hint="acc", **conv_attrs), "int64")
            if weight != 1:
                acc = b.op("Mul", [acc, b.const(weight, np.int64)])
            terms.append(acc)
    acc = _add_all(b, terms)
    o = w.shape[0]
    acc = b.op("Add", [acc, b.const(p["bias"].astype(np.int64).reshape(1, o, 1, 1), np.int64, "b")])
    v = b.op("Mul", [acc, b.const(p["m"].astype(np.int64).reshape(1, o, 1, 1), np.int64, "m")])
    if len(n.inputs) > 1:
        res = b.cast(n.inputs[1], "int64")
        v = b.op("Add", [v, b.op("Mul", [res, b.const(p["m_res"].astype(np.int64)
                                                      .reshape(1, o, 1, 1), np.int64, "m_res")])])
    v = _round_shift(b, v, p["shift"].astype(np.int64).reshape(1, o, 1, 1))
    _saturate(b, v, n, n.outputs[0])


def _add_all(b: _Builder, terms: list[str]) -> str:
    """Σ terms with ``Add`` (ORT's ``Sum`` has no int64 kernel)."""
    v = terms[0]
    for t in terms[1:]:
        v = b.op("Add", [v, t])
    return v


def _int_weighted_sum(b: _Builder, n: Node) -> None:  # add, requantize
    m = n.params["m"].astype(np.int64)
    terms = [b.op("Mul", [b.cast(x, "int64"), b.const(int(mi), np.int64, "m")])
             for x, mi in zip(n.inputs, m, strict=True)]
    v = _add_all(b, terms)
    _saturate(b, _round_shift(b, v, n.params["shift"].astype(np.int64)[:1]), n, n.outputs[0])


def _int_concat(b: _Builder, n: Node) -> None:
    parts = []
    out_dtype = _tensor(b.g, n.outputs[0]).dtype
    for i, x in enumerate(n.inputs):
        v = b.op("Mul", [b.cast(x, "int64"), b.const(int(n.params["m"][i]), np.int64, "m")])
        v = _round_shift(b, v, np.asarray([int(n.params["shift"][i])], np.int64))
        lo, hi = QRANGE[out_dtype]
        parts.append(b.cast(b.op("Clip", [v, b.const(lo, np.int64), b.const(hi, np.int64)]),
                            out_dtype))
    b.op("Concat", parts, n.outputs[0], axis=int(n.attrs["axis"]))


def _int_quantize(b: _Builder, n: Node) -> None:
    out = _tensor(b.g, n.outputs[0])
    inv = np.float32(1.0) / np.float32(out.scale or 1.0)
    r = b.op("Round", [b.op("Mul", [n.inputs[0], b.const(inv, np.float32, "inv_scale")])])
    lo, hi = QRANGE[out.dtype]
    r = b.op("Clip", [r, b.const(lo, np.float32), b.const(hi, np.float32)])
    b.cast(r, out.dtype, n.outputs[0])


def _int_dequantize(b: _Builder, n: Node) -> None:
    sc = float(_tensor(b.g, n.inputs[0]).scale or 1.0)
    v = b.op("Mul", [b.cast(n.inputs[0], "float64"), b.const(sc, np.float64, "scale")])
    b.cast(v, "float32", n.outputs[0])


def _via(b: _Builder, n: Node, native: tuple[str, ...], wide: str, op_type: str,
         extra: Sequence[str] = (), **attrs: Any) -> None:
    """``op_type`` on the int tensor, through ``wide`` where ORT has no kernel for its dtype."""
    dtype = _tensor(b.g, n.inputs[0]).dtype
    if dtype in native:
        b.op(op_type, [n.inputs[0], *extra], n.outputs[0], **attrs)
        return
    y = b.op(op_type, [b.cast(n.inputs[0], wide), *extra], **attrs)
    b.cast(y, _tensor(b.g, n.outputs[0]).dtype, n.outputs[0])


def _pool_attrs(n: Node) -> dict[str, Any]:
    a = n.attrs
    return {"kernel_shape": list(a["kernel"]), "strides": list(a["stride"]),
            "pads": [*a["padding"], *a["padding"]], "ceil_mode": int(bool(a.get("ceil_mode")))}


def _upsample(b: _Builder, n: Node, x: str, out: str) -> None:
    """Nearest upsample by integer factors as Unsqueeze → Expand → Reshape (any dtype, exact)."""
    fh, fw = (int(v) for v in n.attrs["scale"])
    _, c, h, w = _tensor(b.g, n.inputs[0]).shape
    u = b.op("Unsqueeze", [x, b.const([3, 5], np.int64)])
    e = b.op("Expand", [u, b.const([1, 1, 1, fh, 1, fw], np.int64)])
    b.op("Reshape", [e, b.const([0, c, h * fh, w * fw], np.int64)], out)


def _reshape(b: _Builder, n: Node, x: str, out: str) -> None:
    batch = b.op("Shape", [x], start=0, end=1)
    shape = b.op("Concat", [batch, b.const([int(s) for s in n.attrs["shape"]], np.int64)], axis=0)
    b.op("Reshape", [x, shape], out)


def _lower_int(b: _Builder, n: Node) -> None:
    if n.op == "conv2d":
        _int_conv(b, n)
    elif n.op in ("add", "requantize"):
        _int_weighted_sum(b, n)
    elif n.op == "concat":
        _int_concat(b, n)
    elif n.op == "quantize":
        _int_quantize(b, n)
    elif n.op == "dequantize":
        _int_dequantize(b, n)
    elif n.op == "maxpool":
        _via(b, n, ("int8",), "float32", "MaxPool", **_pool_attrs(n))
    elif n.op == "relu":
        _via(b, n, ("int8", "int32"), "int32", "Relu")
    elif n.op == "upsample_nearest":
        _upsample(b, n, n.inputs[0], n.outputs[0])
    elif n.op == "reshape":
        _reshape(b, n, n.inputs[0], n.outputs[0])
    elif n.op == "permute":
        b.op("Transpose", [n.inputs[0]], n.outputs[0], perm=[int(d) for d in n.attrs["dims"]])
    else:
        _unsupported(b, n)


# --------------------------------------------------------------------------- QDQ form


def _zp(dtype: str) -> Any:
    return NP_TYPE[dtype]


def _dq(b: _Builder, x: str, scale: float | np.ndarray, axis: int | None = None) -> str:
    dtype = _tensor(b.g, x).dtype if x in b.g.tensors else "int32"
    sc = np.asarray(scale, np.float32)
    attrs = {"axis": axis} if axis is not None else {}
    zp = np.zeros(sc.shape, _zp(dtype))
    return b.op("DequantizeLinear", [x, b.const(sc, np.float32, "scale"),
                                     b.const(zp, _zp(dtype), "zp")], hint="dq", **attrs)


def _q(b: _Builder, v: str, out: str) -> None:
    t = _tensor(b.g, out)
    b.op("QuantizeLinear", [v, b.const(np.float32(t.scale), np.float32, "scale"),
                            b.const(0, _zp(t.dtype), "zp")], out)


def _act(b: _Builder, n: Node, v: str) -> str:
    clip = n.attrs.get("clip")
    if not clip:
        return v
    s_out = float(_tensor(b.g, n.outputs[0]).scale)
    lo, hi = QRANGE[_tensor(b.g, n.outputs[0]).dtype]
    if int(clip[0]) == 0 and int(clip[1]) >= hi:
        return b.op("Relu", [v])
    return b.op("Clip", [v, b.const(np.float32(int(clip[0]) * s_out), np.float32),
                         b.const(np.float32(int(clip[1]) * s_out), np.float32)])


def _ratio(m: Any, s: Any) -> np.ndarray:
    return np.asarray(m, np.float64) / np.power(2.0, np.asarray(s, np.float64))


def _scaled_dq(b: _Builder, x: str, ratio: float, s_out: float) -> str:
    """``x · ratio · s_out`` as a float: a DQ (positive scale), negated for a negative ratio."""
    y = _dq(b, x, abs(ratio) * s_out)
    return b.op("Neg", [y]) if ratio < 0 else y


def _qdq_conv(b: _Builder, n: Node) -> None:
    g, p, a = b.g, n.params, n.attrs
    s_in = float(_tensor(g, n.inputs[0]).scale)
    s_out = float(_tensor(g, n.outputs[0]).scale)
    r = _ratio(p["m"], p["shift"])
    if np.any(r <= 0):
        raise UnsupportedOp(f"{g.path}: node {n.name!r}: conv2d with a non-positive multiplier "
                            "has no QDQ form (per-channel dequantize scales must be positive)")
    w_scale = (r * s_out / s_in).astype(np.float32)
    o = p["weight"].shape[0]
    w = b.op("DequantizeLinear", [b.const(p["weight"], np.int8, "w"),
                                  b.const(w_scale, np.float32, "w_scale"),
                                  b.const(np.zeros(o, np.int8), np.int8, "w_zp")], axis=0)
    bias = b.op("DequantizeLinear", [b.const(p["bias"].astype(np.int32), np.int32, "b"),
                                     b.const(np.float32(s_in) * w_scale, np.float32, "b_scale"),
                                     b.const(np.zeros(o, np.int32), np.int32, "b_zp")], axis=0)
    v = b.op("Conv", [_dq(b, n.inputs[0], s_in), w, bias], strides=list(a["stride"]),
             pads=[*a["padding"], *a["padding"]], dilations=list(a["dilation"]),
             group=int(a["groups"]), kernel_shape=list(p["weight"].shape[2:]))
    if len(n.inputs) > 1:
        rr = _ratio(p["m_res"], p["shift"])
        if not np.allclose(rr, rr[0], rtol=1e-6, atol=0):
            raise UnsupportedOp(f"{g.path}: node {n.name!r}: a residual with per-channel "
                                "multipliers has no QDQ form (one dequantize scale per tensor)")
        v = b.op("Add", [v, _scaled_dq(b, n.inputs[1], float(rr[0]), s_out)])
    _q(b, _act(b, n, v), n.outputs[0])


def _qdq_sum(b: _Builder, n: Node) -> None:
    s_out = float(_tensor(b.g, n.outputs[0]).scale)
    r = _ratio(n.params["m"], n.params["shift"][0])
    terms = [_scaled_dq(b, x, float(ri), s_out) for x, ri in zip(n.inputs, r, strict=True)]
    v = terms[0] if len(terms) == 1 else b.op("Sum", terms)
    _q(b, _act(b, n, v), n.outputs[0])


def _qdq_concat(b: _Builder, n: Node) -> None:
    s_out = float(_tensor(b.g, n.outputs[0]).scale)
    r = _ratio(n.params["m"], n.params["shift"])
    parts = [_scaled_dq(b, x, float(ri), s_out) for x, ri in zip(n.inputs, r, strict=True)]
    _q(b, b.op("Concat", parts, axis=int(n.attrs["axis"])), n.outputs[0])


def _qdq_same_scale(b: _Builder, n: Node, op_type: str, *extra: str, **attrs: Any) -> None:
    x = _dq(b, n.inputs[0], float(_tensor(b.g, n.inputs[0]).scale))
    _q(b, b.op(op_type, [x, *extra], **attrs), n.outputs[0])


def _lower_qdq(b: _Builder, n: Node) -> None:
    t = b.g.tensors
    if n.op == "conv2d":
        _qdq_conv(b, n)
    elif n.op in ("add", "requantize"):
        _qdq_sum(b, n)
    elif n.op == "concat":
        _qdq_concat(b, n)
    elif n.op == "quantize":
        _q(b, n.inputs[0], n.outputs[0])
    elif n.op == "dequantize":
        b.op("DequantizeLinear", [n.inputs[0],
                                  b.const(np.float32(t[n.inputs[0]].scale), np.float32, "scale"),
                                  b.const(0, _zp(t[n.inputs[0]].dtype), "zp")], n.outputs[0])
    elif n.op == "maxpool":
        _qdq_same_scale(b, n, "MaxPool", **_pool_attrs(n))
    elif n.op == "relu":
        _qdq_same_scale(b, n, "Relu")
    elif n.op == "upsample_nearest":
        fh, fw = (float(v) for v in n.attrs["scale"])
        _qdq_same_scale(b, n, "Resize", "", b.const([1, 1, fh, fw], np.float32, "scales"),
                        mode="nearest", coordinate_transformation_mode="asymmetric",
                        nearest_mode="floor")
    elif n.op == "reshape":
        _reshape(b, n, n.inputs[0], n.outputs[0])
    elif n.op == "permute":
        b.op("Transpose", [n.inputs[0]], n.outputs[0], perm=[int(d) for d in n.attrs["dims"]])
    else:
        _unsupported(b, n)


# --------------------------------------------------------------------------- the model

SUPPORTED = ("quantize", "dequantize", "conv2d", "add", "concat", "requantize", "maxpool",
             "upsample_nearest", "relu", "reshape", "permute")


def _unsupported(b: _Builder, n: Node) -> None:
    raise UnsupportedOp(f"{b.g.path}: node {n.name!r}: op {n.op!r} has no ONNX form in hat-onnx "
                        f"(it lowers: {', '.join(SUPPORTED)}); export a model without it or "
                        "extend hat_onnx.lower")


def to_onnx(g: Hbir, form: str = "int", expose: Sequence[str] = ()) -> onnx.ModelProto:
    """The ONNX model of ``g`` in ``form`` (``"int"`` or ``"qdq"``), batch dimension ``N``.

    :param expose: extra IR tensors to add as graph outputs (agreement per tensor).
    :raises UnsupportedOp: a node ONNX cannot express, naming it.
    """
    if form not in FORMS:
        raise ValueError(f"form {form!r}; expected one of {FORMS}")
    for n in g.nodes:  # every refusal before any work
        if n.op not in SUPPORTED:
            _unsupported(_Builder(g), n)
    b = _Builder(g)
    lower = _lower_int if form == "int" else _lower_qdq
    for n in g.nodes:
        b.where = n.name
        lower(b, n)

    def info(name: str) -> onnx.ValueInfoProto:
        t = g.tensors[name]
        return helper.make_tensor_value_info(name, ONNX_TYPE[t.dtype], ["N", *t.shape[1:]])

    outputs = [info(o) for o in g.outputs] + [info(t) for t in expose if t not in g.outputs]
    graph = helper.make_graph(b.nodes, f"hat_{form}", [info(i) for i in g.inputs], outputs,
                              b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="hat-onnx", doc_string=_DOC[form])
    model.ir_version = IR_VERSION
    meta = {"hat.form": form, "hat.source": "hbir", "hat.march": str(g.meta.get("march")),
            "hat.output_tree": g.meta.get("output_tree") or ""}
    helper.set_model_props(model, meta)
    return model


_DOC = {
    "int": "HAT integer model, bit-exact form of the .hbir (docs/onnx.md)",
    "qdq": "HAT integer model, QDQ form (docs/onnx.md)",
}


def check(model: onnx.ModelProto, g: Hbir | None = None) -> None:
    """``onnx.checker`` (full check, shape inference) and, given ``g``, every IR tensor's
    inferred shape against the ``.hbir`` (catches e.g. a pooling rounding that disagrees).

    :raises UserError: the model does not pass, naming the tensor.
    """
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise UserError(f"the exported ONNX model does not pass onnx.checker: {exc}") from None
    if g is None:
        return
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    shapes = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    for name, t in g.tensors.items():
        got = shapes.get(name)
        if got is not None and got[1:] != list(t.shape[1:]):
            raise UserError(f"{g.path}: tensor {name!r}: ONNX infers shape {got}, the .hbir says "
                            f"{t.shape}")
