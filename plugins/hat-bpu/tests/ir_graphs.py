"""Random integer graphs (hypothesis) for the compiler/runtime tests: every op of the IR's op
table with random attributes and parameters inside the documented ranges (docs/formats.md),
tensors read by several ops, graph outputs that are also read inside, int8/int16 tensors."""

from __future__ import annotations

from typing import Any

import numpy as np
from hat_bpu.ir import graph as ir
from hat_bpu.quant import qspec
from hypothesis import strategies as st


class _Builder:
    def __init__(self, draw: Any, rng: np.random.Generator) -> None:
        self.draw, self.rng = draw, rng
        self.tensors: dict[str, ir.Tensor] = {}
        self.nodes: list[ir.Node] = []

    def tensor(self, shape: list[int], dtype: str) -> str:
        name = f"t{len(self.tensors)}"
        self.tensors[name] = ir.Tensor(name, shape, dtype, float(2.0 ** self.rng.uniform(-8, 0)))
        return name

    def node(self, op: str, inputs: list[str], shape: list[int], dtype: str,
             attrs: dict[str, Any] | None = None, params: dict[str, np.ndarray] | None = None
             ) -> str:
        out = self.tensor(shape, dtype)
        self.nodes.append(ir.Node(op, f"n{len(self.nodes)}_{op}", inputs, [out], attrs or {},
                                  params or {}))
        return out

    def mult(self, lo: float, hi: float, n: int = 1, neg: bool = False) -> tuple[np.ndarray, ...]:
        m, s = qspec.requant_params(2.0 ** self.rng.uniform(lo, hi, n))
        if neg:
            m = m * self.rng.choice([-1, 1], n)
        return m, s

    def clip(self, dtype: str) -> tuple[str, list[int] | None]:
        act = self.draw(st.sampled_from(["none", "relu", "relu6"]))
        hi = qspec.qrange(dtype)[1]
        return act, (None if act == "none" else [0, hi if act == "relu" else
                                                  int(self.rng.integers(1, hi))])


def _conv(b: _Builder, x: str, pool: list[str]) -> str:
    draw, rng = b.draw, b.rng
    n, c, h, w = b.tensors[x].shape
    kind = draw(st.sampled_from(["dense", "dense", "depthwise", "grouped"]))
    groups = {"dense": 1, "depthwise": c, "grouped": 2 if c % 2 == 0 else 1}[kind]
    o = c if kind == "depthwise" else groups * draw(st.integers(1, 12))
    k = draw(st.sampled_from([1, 3]))
    stride = draw(st.sampled_from([1, 1, 2]))
    dil = draw(st.sampled_from([1, 1, 2])) if k == 3 else 1
    pad = (k // 2) * dil
    oh, ow = (h + 2 * pad - dil * (k - 1) - 1) // stride + 1, (w + 2 * pad - dil * (k - 1) - 1) // stride + 1
    dtype = draw(st.sampled_from(["int8", "int8", "int16"]))
    weight = rng.integers(-127, 128, (o, c // groups, k, k)).astype(np.int8)
    big_bias = draw(st.booleans())
    bias = rng.integers(-(2**30) if big_bias else -4096, 2**30 if big_bias else 4096, o)
    k_terms = c // groups * k * k
    xmax = 128 if b.tensors[x].dtype == "int8" else 32768
    # acc std ≈ 73·x_std·sqrt(K): aim the int8 output's std at a few tens of LSB
    base = -np.log2(xmax * np.sqrt(k_terms)) - 1 + (8 if dtype == "int16" else 0)
    m, s = b.mult(base - 2, base + 2, o)
    params = {"weight": weight, "bias": bias.astype(np.int32), "m": m, "shift": s,
              "w_scale": np.ones(o)}
    inputs = [x]
    same = [t for t in pool if b.tensors[t].shape == [n, o, oh, ow]]
    if same and draw(st.booleans()):
        inputs.append(draw(st.sampled_from(same)))
        params["m_res"] = np.minimum(m * rng.integers(1, 4, o), 2**31 - 1)
    act, clip = b.clip(dtype)
    return b.node("conv2d", inputs, [n, o, oh, ow], dtype,
                  {"stride": [stride, stride], "padding": [pad, pad], "dilation": [dil, dil],
                   "groups": groups, "act": act, "clip": clip}, params)


@st.composite
def int_graphs(draw: Any) -> ir.Graph:
    """A random valid integer graph: quantize, 1-7 random ops, 1-3 dequantized outputs."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    b = _Builder(draw, rng)
    h, w = draw(st.sampled_from([4, 6, 8])), draw(st.sampled_from([4, 6, 8]))
    inp = "img"
    b.tensors[inp] = ir.Tensor(inp, [1, 3, h, w], "float32", None)
    pool = [b.node("quantize", [inp], [1, 3, h, w], "int8")]
    b.tensors[pool[0]].scale = 1 / 128
    ops = draw(st.lists(st.sampled_from(["conv2d", "conv2d", "add", "requantize", "relu",
                                         "maxpool", "upsample_nearest", "concat", "permute"]),
                        min_size=1, max_size=7))
    for op in ops:
        x = draw(st.sampled_from([pool[-1]] * 3 + pool[-3:] + pool[:1]))
        shape, dtype = b.tensors[x].shape, b.tensors[x].dtype
        if op == "conv2d":
            pool.append(_conv(b, x, pool))
        elif op == "add":
            same = [t for t in pool if b.tensors[t].shape == shape]
            xs = [x] + draw(st.lists(st.sampled_from(same), min_size=1, max_size=2))
            # the march's add arithmetic: bayes-family multipliers reach 2**45
            march = draw(st.sampled_from([None, "bayes-e", "bernoulli2"] if len(xs) == 2
                                         else [None, "bayes-e"]))
            ms, s = qspec.add_params([float(2.0 ** rng.uniform(-2, 1)) for _ in xs], 1.0, march)
            m = np.concatenate(ms)
            act, clip = b.clip(dtype)
            pool.append(b.node("add", xs, shape, draw(st.sampled_from(["int8", "int16"])),
                               {"act": act, "clip": clip}, {"m": m, "shift": s[:1]}))
        elif op == "requantize":
            m, s = b.mult(-2, 2, neg=True)
            act, clip = b.clip(dtype)
            pool.append(b.node("requantize", [x], shape, draw(st.sampled_from(["int8", "int16"])),
                               {"act": act, "clip": clip}, {"m": m, "shift": s}))
        elif op == "relu":
            pool.append(b.node("relu", [x], shape, dtype))
        elif op == "maxpool":
            k = draw(st.sampled_from([2, 3]))
            stride, ceil = draw(st.sampled_from([1, 2])), draw(st.booleans())
            pad = draw(st.integers(0, k // 2))
            oh = -(-(shape[2] + 2 * pad - k) // stride) + 1 if ceil else \
                (shape[2] + 2 * pad - k) // stride + 1
            ow = -(-(shape[3] + 2 * pad - k) // stride) + 1 if ceil else \
                (shape[3] + 2 * pad - k) // stride + 1
            if ceil and (oh - 1) * stride >= shape[2] + pad:
                oh -= 1
            if ceil and (ow - 1) * stride >= shape[3] + pad:
                ow -= 1
            if min(oh, ow) < 1:
                continue
            pool.append(b.node("maxpool", [x], [1, shape[1], oh, ow], dtype,
                               {"kernel": [k, k], "stride": [stride, stride],
                                "padding": [pad, pad], "ceil_mode": ceil}))
        elif op == "upsample_nearest":
            f = draw(st.sampled_from([[2, 2], [1, 2]]))
            pool.append(b.node("upsample_nearest", [x], [1, shape[1], shape[2] * f[0],
                                                         shape[3] * f[1]], dtype, {"scale": f}))
        elif op == "concat":
            same = [t for t in pool if b.tensors[t].shape[2:] == shape[2:]]
            xs = [x, draw(st.sampled_from(same))]
            m, s = b.mult(-1, 1, 2)
            pool.append(b.node("concat", xs, [1, sum(b.tensors[t].shape[1] for t in xs),
                                              *shape[2:]], "int8", {"axis": 1},
                               {"m": m, "shift": s}))
        else:
            dims = draw(st.sampled_from([[0, 1, 3, 2], [0, 2, 1, 3]]))
            pool.append(b.node("permute", [x], [shape[d] for d in dims], dtype, {"dims": dims}))
    picked = draw(st.lists(st.sampled_from(pool[1:] or pool), min_size=0, max_size=2))
    outs = sorted(set(picked) | {pool[-1]})
    names = [b.node("dequantize", [t], b.tensors[t].shape, "float32") for t in outs]
    for n in names:
        b.tensors[n].scale = None
    flat = b.node("reshape", [pool[-1]], [1, int(np.prod(b.tensors[pool[-1]].shape[1:]))],
                  b.tensors[pool[-1]].dtype, {"shape": [int(np.prod(b.tensors[pool[-1]].shape[1:]))]})
    names.append(b.node("dequantize", [flat], b.tensors[flat].shape, "float32"))
    b.tensors[names[-1]].scale = None
    g = ir.Graph(b.tensors, b.nodes, [inp], names, {"march": "bayes-e"})
    g.validate()
    return g
