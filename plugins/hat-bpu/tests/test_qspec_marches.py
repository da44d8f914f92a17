"""Each row of docs/bpu.md's per-march table against an int64 reference written from the table.

The reference below uses Python integers and ``fractions.Fraction`` only — no helper of
``hat_bpu`` — and is compared with the fast paths: the multipliers of ``qspec`` executed by the
simulator's kernels and by the fake-quant integer ops (what QAT trains), for every march, int8
and int16, over scales, shapes and values drawn by hypothesis.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

MARCHES = ("bernoulli", "bernoulli2", "bayes", "bayes-e")
RANGE = {"int8": (-128, 127), "int16": (-32768, 32767)}


# --- the reference, from the table -------------------------------------------------------------

def ref_round_shift(v: int, s: int) -> int:
    """round_half_even(v / 2**s) on Python integers."""
    q, r = divmod(v, 1 << s)
    twice = 2 * r
    if twice > (1 << s) or (twice == (1 << s) and q % 2 == 1):
        q += 1
    return q


def ref_round(x: Fraction) -> int:
    """round half to even of an exact rational."""
    f = math.floor(x)
    d = x - f
    return f + 1 if d > Fraction(1, 2) or (d == Fraction(1, 2) and f % 2 == 1) else f


def ref_multiplier(r: float) -> tuple[int, int]:
    """Table row "requant multiplier": 31-bit m normalised into [2**30, 2**31), m / 2**s ≈ r."""
    fr = Fraction(r)
    e = math.floor(math.log2(r))
    while Fraction(2) ** e > fr:
        e -= 1
    while Fraction(2) ** (e + 1) <= fr:
        e += 1
    s = 30 - e
    m = ref_round(fr * Fraction(2) ** s) if s >= 0 else ref_round(fr / Fraction(2) ** -s)
    if m == 1 << 31:
        m, s = m // 2, s - 1
    return m, s


class Int32Overflow(ArithmeticError):
    """The table's int32 add intermediate cannot hold this element: what the device does then
    (saturate? wrap?) is not in Horizon's public sources, so the table does not specify it."""


def ref_add(xs: list[int], scales: list[float], s_out: float, march: str, dtype: str) -> int:
    """Table rows "add" (per march) then "requant", one element."""
    lo, hi = RANGE[dtype]
    if march in ("bayes", "bayes-e"):  # both inputs at max(s) / 2**14, then one requant
        s_int = max(scales) / 2**14
        a = [ref_round(Fraction(s) / Fraction(s_int)) for s in scales]
    elif march == "bernoulli2":  # feature (smaller scale) x int8, sumin x 15-bit << shift
        f, g = (0, 1) if scales[0] <= scales[1] else (1, 0)
        s_int = max(scales[f] / 127, scales[g] / 2**25)
        a = [0, 0]
        a[f] = max(-128, min(127, ref_round(Fraction(scales[f]) / Fraction(s_int))))
        w = ref_round(Fraction(scales[g]) / Fraction(s_int))
        e = w.bit_length()  # w = mant · 2**e, mant in [0.5, 1)
        qm = min(w >> max(e - 15, 0), (1 << 15) - 1)  # the 15 leading bits
        a[g] = qm << max(e - 15, 0)
    else:  # bernoulli (and the generic rule): one shared shift
        rs = [s / s_out for s in scales]
        big = max(rs)
        e = math.floor(math.log2(big))
        s = min(30 - e, 62)
        ms = [ref_round(Fraction(r) * Fraction(2) ** s) for r in rs]
        return max(lo, min(hi, ref_round_shift(sum(x * m for x, m in zip(xs, ms, strict=True)), s)))
    acc = sum(x * ai for x, ai in zip(xs, a, strict=True))
    if abs(acc) >= 2**31:  # the int32 intermediate of the table overflows
        raise Int32Overflow(acc)
    m, s = ref_multiplier(s_int / s_out)
    return max(lo, min(hi, ref_round_shift(acc * m, s)))


def ref_requant(v: int, r: float, dtype: str, clip: tuple[int, int] | None = None) -> int:
    """Table row "conv requant": sat(clip(round_shift(acc · m, s)))."""
    m, s = ref_multiplier(r)
    y = ref_round_shift(v * m, s)
    if clip is not None:
        y = max(clip[0], min(clip[1], y))
    lo, hi = RANGE[dtype]
    return max(lo, min(hi, y))


# --- the fast paths ----------------------------------------------------------------------------

def sim_add(xs: np.ndarray, scales: list[float], s_out: float, march: str, dtype: str
            ) -> np.ndarray:
    """The simulator's add kernel on qspec's multipliers (a one-node graph)."""
    from hat_bpu.ir import graph as ir
    from hat_bpu.ir.simulator import Simulator
    from hat_bpu.quant import qspec

    ms, s = qspec.add_params(scales, s_out, march)
    n = xs.shape[1]
    tensors = {f"x{i}": ir.Tensor(f"x{i}", [1, n], dtype, scales[i]) for i in range(2)}
    tensors["y"] = ir.Tensor("y", [1, n], dtype, s_out)
    node = ir.Node("add", "add", ["x0", "x1"], ["y"], {"act": "none", "clip": None},
                   {"m": np.concatenate(ms), "shift": s})
    sim = Simulator(ir.Graph(tensors, [node], ["x0", "x1"], ["y"], {}))
    fn = sim.steps[0][2]
    return fn([torch.from_numpy(xs[0]).float(), torch.from_numpy(xs[1]).float()]).numpy()


def fq_add(xs: np.ndarray, scales: list[float], s_out: float, march: str, dtype: str
           ) -> np.ndarray:
    """The fake-quant add (what QAT trains), back on the integer grid."""
    from hat_bpu.quant import intmath

    ins = [torch.from_numpy(xs[i]).double() * scales[i] for i in range(2)]
    y = intmath.int_sum([t.float() for t in ins], scales, s_out, dtype, None, march)
    return torch.round(y.double() / s_out).numpy()


scale = st.floats(1e-4, 1.0, allow_nan=False, allow_infinity=False)


@pytest.mark.parametrize("march", MARCHES)
@pytest.mark.parametrize("dtype", ["int8", "int16"])
@settings(max_examples=10, deadline=None)
@given(data=st.data(), s_a=scale, s_b=scale, s_out=scale)
def test_add_matches_reference(march: str, dtype: str, data: st.DataObject, s_a: float,
                               s_b: float, s_out: float) -> None:
    lo, hi = RANGE[dtype]
    n = data.draw(st.integers(1, 12))
    vals = data.draw(st.lists(st.lists(st.integers(lo, hi), min_size=n, max_size=n),
                              min_size=2, max_size=2))
    xs = np.array(vals, np.int64)
    scales = [s_a, s_b]
    try:
        want = np.array([ref_add([int(a), int(b)], scales, s_out, march, dtype)
                         for a, b in zip(xs[0], xs[1], strict=True)], np.float64)
    except Int32Overflow:  # e.g. bernoulli2, int16, input scales 1e-4 vs 1: unspecified, skipped
        assume(False)
    assert np.array_equal(sim_add(xs, scales, s_out, march, dtype), want)
    assert np.array_equal(fq_add(xs, scales, s_out, march, dtype), want)


@pytest.mark.parametrize("march", ["bernoulli2", "bayes-e"])
def test_add_weights_round_the_exact_quotient(march: str) -> None:
    """Found by a random run: 0.5 / ((1/3) / 127) is 190.5 in float64 but 190.50...01 exactly,
    so bernoulli2's weight is 191; rounding the float quotient gave 190 and 64 for 65."""
    xs = np.array([[64], [1]], np.int64)
    scales = [0.5, 1 / 3]
    want = np.array([ref_add([64, 1], scales, 0.5, march, "int8")], np.float64)
    assert np.array_equal(sim_add(xs, scales, 0.5, march, "int8"), want)
    assert np.array_equal(fq_add(xs, scales, 0.5, march, "int8"), want)


@pytest.mark.parametrize("march", MARCHES)
@pytest.mark.parametrize("dtype", ["int8", "int16"])
@settings(max_examples=10, deadline=None)
@given(data=st.data(), s_in=scale, s_out=scale)
def test_conv_requant_matches_reference(march: str, dtype: str, data: st.DataObject,
                                        s_in: float, s_out: float) -> None:
    """A 1x1 conv (acc = x · w + bias) through the simulator's conv kernel and the fake-quant
    integer conv, against the table's requantization (31-bit multiplier, one shift)."""
    from hat_bpu.device.march import get_march
    from hat_bpu.quant import intmath, qspec

    pow2 = get_march(march).pow2_scales
    c = data.draw(st.integers(1, 6))
    w = torch.tensor(data.draw(st.lists(st.floats(-1, 1, width=32), min_size=c, max_size=c)))
    w = w.reshape(c, 1, 1, 1)
    if float(w.abs().max()) == 0:
        w[0] = 0.5
    b = torch.tensor(data.draw(st.lists(st.floats(-2, 2, width=32), min_size=c, max_size=c)))
    x = torch.tensor(data.draw(st.lists(st.integers(-128, 127), min_size=5, max_size=5)),
                     dtype=torch.float64).reshape(1, 1, 1, 5)
    s_in_eff = float(qspec.scale_from_amax(torch.tensor(1.0), "int8", pow2)) if pow2 else s_in
    s_out_eff = float(qspec.scale_from_amax(torch.tensor(s_out * 127), "int8", pow2))
    p = intmath.conv_params(w, b, pow2, s_in_eff, s_out_eff, None)
    if pow2:
        assert all(qspec.is_pow2(float(v)) for v in p["w_scale"])
    want = np.zeros((1, c, 1, 5))
    for o in range(c):
        r = float(np.float32(s_in_eff) * np.float32(p["w_scale"][o])) / s_out_eff
        for j in range(5):
            acc = int(x[0, 0, 0, j]) * int(p["weight"][o, 0, 0, 0]) + int(p["bias"][o])
            want[0, o, 0, j] = ref_requant(acc, r, dtype)
    conv = torch.nn.Conv2d(1, c, 1)

    out = type("Out", (), {"scale": torch.tensor(s_out_eff), "dtype": dtype,
                           "tracks": staticmethod(lambda: False)})  # int_conv's view of an ActFQ
    y = intmath.int_conv((x * s_in_eff).float(), None, w, b, conv, s_in_eff, None, out,
                         lambda s: None, pow2)
    assert np.array_equal(torch.round(y.double() / s_out_eff).numpy(), want)


def _add_graph(scales: list[float], dtype: str):  # type: ignore[no-untyped-def]
    from hat_bpu.ir import graph as ir

    tensors = {f"x{i}": ir.Tensor(f"x{i}", [1, 4], dtype, scales[i]) for i in range(2)}
    tensors["y"] = ir.Tensor("y", [1, 4], dtype, max(scales))
    node = ir.Node("add", "head.fuse_add", ["x0", "x1"], ["y"], {"act": "none", "clip": None},
                   {"m": np.ones(2, np.int64), "shift": np.zeros(1, np.int64)})
    return ir.Graph(tensors, [node], ["x0", "x1"], ["y"], {})


def test_checker_refuses_the_bernoulli2_int16_add_whose_int32_intermediate_overflows() -> None:
    from hat_bpu.device.checker import check_scales
    from hat_bpu.device.march import get_march

    problems = check_scales(_add_graph([1e-4, 1.0], "int16"), get_march("bernoulli2"))
    assert len(problems) == 1
    assert "head.fuse_add" in problems[0] and "0.0001" in problems[0] and ", 1 " in problems[0]
    assert "int32" in problems[0]
    with pytest.raises(Int32Overflow):  # the reference agrees that it overflows
        ref_add([-32768, -32768], [1e-4, 1.0], 1.0, "bernoulli2", "int16")
    # the same scales in int8, and the same int16 add on the other marches, are fine
    assert check_scales(_add_graph([1e-4, 1.0], "int8"), get_march("bernoulli2")) == []
    for march in ("bernoulli", "bayes", "bayes-e"):
        assert check_scales(_add_graph([1e-4, 1.0], "int16"), get_march(march)) == []


@pytest.mark.parametrize("dtype", ["int8", "int16"])
@settings(max_examples=25, deadline=None)
@given(s_a=scale, s_b=scale)
def test_checker_refuses_exactly_the_adds_the_reference_overflows(dtype: str, s_a: float,
                                                                   s_b: float) -> None:
    """Refused iff some input pair in range overflows the reference's int32 intermediate (the
    extremes are the worst case: |Σ x_i a_i| is largest at x_i = qmin)."""
    from hat_bpu.device.checker import check_scales
    from hat_bpu.device.march import get_march

    lo, _ = RANGE[dtype]
    try:
        ref_add([lo, lo], [s_a, s_b], max(s_a, s_b), "bernoulli2", dtype)
        overflows = False
    except Int32Overflow:
        overflows = True
    refused = bool(check_scales(_add_graph([s_a, s_b], dtype), get_march("bernoulli2")))
    assert refused == overflows
