"""The compiled conv epilogue (hat_bpu._native) gives the torch expression's bits, declines
what it cannot serve, and the simulator and fake-quant eval give the same outputs with it and
without it."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from deploy_fixtures import add_inputs, calibrate, small_model, spread_bn, yuv_input
from example_net import MiniFCOS
from hat_bpu import native
from hat_bpu.ir import simulator
from hat_bpu.ir.reference import run_ir
from hat_bpu.ir.simulator import Simulator
from hat_bpu.quant.convert import convert

built = pytest.mark.skipif(not native.available(), reason="hat_bpu._native not built")


def test_built_where_a_compiler_is() -> None:
    """The package build compiles it wherever a C compiler exists (Makefile's setup)."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler on this machine")
    assert native.available()


def torch_epilogue(acc: torch.Tensor, bias: torch.Tensor | None, mult: torch.Tensor,
                   lo: float, hi: float, res: torch.Tensor | None, res_mult: torch.Tensor | None,
                   out_scale: float | None) -> torch.Tensor:
    """The expression, written with torch ops (per-channel constants broadcast on dim 1)."""
    shape = (1, -1) + (1,) * (acc.dim() - 2)
    v = acc.double()
    if bias is not None:
        v = v + bias.reshape(shape)
    v = v * mult.reshape(shape)
    if res is not None:
        v = v + (res.double() * res_mult.reshape(shape) if res_mult is not None else res)
    q = v.round().clamp(lo, hi).float()
    return q * torch.tensor(out_scale, dtype=torch.float32) if out_scale is not None else q


def layout(t: torch.Tensor, how: str) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if how == "nhwc" else t.contiguous()


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@pytest.fixture(params=["best", "base"])
def isa(request: pytest.FixtureRequest) -> Iterator[str]:
    """Both loop sets: the CPU's best (AVX2 with its rounding instruction, where it has it) and
    the baseline one (rounding by the 1.5·2**52 addition)."""
    yield native._native.set_isa(request.param)
    native._native.set_isa("best")


@built
@pytest.mark.parametrize("how", ["nhwc", "nchw", "rows", "wide"])
@pytest.mark.parametrize("acc_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("res_kind", ["none", "f32", "f64"])
def test_requant_gives_the_torch_bits(how: str, acc_dtype: torch.dtype, res_kind: str,
                                      isa: str) -> None:
    g = torch.Generator().manual_seed(hash((how, str(acc_dtype), res_kind)) % 2**31)
    # rows: more than one span of rows, odd channels; wide: rows longer than a span (1100
    # channels); nchw: planes of 99
    shape = {"rows": (600, 37), "wide": (3, 1100)}.get(how, (2, 37, 9, 11))
    c = shape[1]

    def ints(lim: int, size: tuple[int, ...] = shape) -> torch.Tensor:
        return torch.randint(-lim, lim, size, generator=g).to(acc_dtype)
    acc = ints(2**20)
    # ties: accumulators that land exactly on x.5 after the multiplier 2**-3, and values far
    # beyond the range (saturate), and small negatives (round to -0.0)
    acc.view(-1)[:40] = torch.arange(-20, 20, dtype=acc_dtype) * 4 + 4
    acc.view(-1)[40:50] = 2.0**30
    acc = acc if acc.dim() == 2 else layout(acc, how)
    mult = torch.rand(c, generator=g, dtype=torch.float64) * 2.0**-10
    mult[:3] = 2.0**-3
    res = res_mult = None
    if res_kind != "none":
        res = ints(128).float() if res_kind == "f32" else ints(128).double() * 0.37
        res = res if res.dim() == 2 else layout(res, how)
        res_mult = torch.rand(c, generator=g, dtype=torch.float64) if res_kind == "f32" else None
    for bias in (None, torch.randint(-5000, 5000, (c,), generator=g).double()):
        for lo, hi, scale in ((-128, 127, None), (0, 127, 0.0371), (-32768, 32767, None)):
            want = torch_epilogue(acc, bias, mult, lo, hi, res, res_mult, scale)
            got = native.requant(acc, bias, mult, lo, hi, res, res_mult, out_scale=scale)
            assert got is not None and got.stride() == acc.stride()
            assert torch.equal(bits(got), bits(want)), (bias is None, lo, scale)
            peak = native.peak_abs(acc, bias)
            v = acc.double() + (0 if bias is None else bias.reshape((1, -1) + (1,) * (acc.dim() - 2)))
            assert peak == float(v.abs().max())


@built
@pytest.mark.parametrize("how", ["nhwc", "nchw"])
def test_requant_of_a_fake_quant_residual_gives_the_torch_bits(how: str, isa: str) -> None:
    """``res_div``: the residual's integers ``round(float64(res) / s)`` taken inside the pass,
    as ``int_conv_fast``'s torch code takes them (copy to float64, divide, round, multiply)."""
    g = torch.Generator().manual_seed(7)
    c, s_res = 24, 0.0371
    acc = layout(torch.randint(-2**20, 2**20, (2, c, 5, 7), generator=g).float(), how)
    res = torch.randint(-128, 128, (2, c, 5, 7), generator=g).float() * s_res
    res.view(-1)[:10] = (torch.arange(10) - 5.0) * s_res * 0.5  # halfway between integers
    res = layout(res, how)
    mult = torch.rand(c, generator=g, dtype=torch.float64) * 2.0**-12
    res_mult = torch.rand(c, generator=g, dtype=torch.float64) * 0.5
    bias = torch.randint(-5000, 5000, (c,), generator=g).double()
    ri = res.double().div(s_res).round().mul(res_mult.reshape(1, -1, 1, 1))
    want = torch_epilogue(acc, bias, mult, -128, 127, ri, None, 0.05)
    got = native.requant(acc, bias, mult, -128, 127, res, res_mult, out_scale=0.05, res_div=s_res)
    assert got is not None and torch.equal(bits(got), bits(want))


@built
@pytest.mark.parametrize("scale", [0.0123, 1 / 128, 3.7e-5, 0.5, 0.1])
def test_quantize_gives_the_torch_bits(scale: float, isa: str) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 17, 33, 9, generator=g) * 100
    x.view(-1)[:20] = (torch.arange(20) - 10.0) * scale * 0.5  # ties
    x.view(-1)[20:30] = torch.tensor([3e9, -3e9, 1e-30, -1e-30, 0.0, -0.0, 2.0**23, 2**22 + 0.5,
                                      -(2**22) - 0.5, 1e38])
    for t in (x, x.contiguous(memory_format=torch.channels_last)):
        got = native.quantize(t, scale)
        assert got is not None and got.stride() == t.stride()
        assert torch.equal(bits(got), bits(torch.div(t, scale).round_()))
    assert native.quantize(x.double(), scale) is None and native.quantize(x[:, :, :5], scale) is None


@built
def test_requant_declines_what_it_cannot_serve() -> None:
    acc = torch.zeros(2, 8, 4, 4)
    m = torch.ones(8, dtype=torch.float64)
    assert native.requant(acc[:, :, :, :2], None, m, -128, 127) is None  # not dense
    assert native.requant(acc.int(), None, m, -128, 127) is None  # not float
    assert native.requant(acc, None, m.float(), -128, 127) is None  # constants not float64
    assert native.requant(acc, None, m[:1], -128, 127) is None  # not per channel
    assert native.requant(acc, None, m, -128, 127, res=layout(acc, "nhwc"),
                          res_mult=m) is None  # residual laid out otherwise
    with native.disabled():
        assert not native.available()
        assert native.requant(acc, None, m, -128, 127) is None
        assert native.peak_abs(acc, None) is None
    assert native.requant(acc, None, m, -128, 127) is not None


def minifcos() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    x = yuv_input(2, 64)
    return calibrate(spread_bn(MiniFCOS(width=8).eval()), x), x


@built
@pytest.mark.parametrize("f64_exact", [2.0**53, 2.0**40, 0.0])
@pytest.mark.parametrize("model", ["smallnet", "minifcos"])
def test_simulator_native_epilogue_equals_torch_and_reference(monkeypatch: pytest.MonkeyPatch,
                                                              f64_exact: float,
                                                              model: str) -> None:
    """Static float64 bound, measured bound (2**40: the weights no longer prove it), int64
    fallback (0: the native epilogue declines): the same outputs, with residual convs
    (smallnet) and two-input adds and channels-last upsampling (minifcos)."""
    q, x = small_model(width=128) if model == "smallnet" else minifcos()
    g = convert(q, x[:1])
    ops = {n.op for n in g.nodes}
    assert ({"conv2d", "upsample_nearest"} <= ops and
            any(len(n.inputs) > 1 for n in g.nodes if n.op == "conv2d")) if model == "smallnet" \
        else any(len(n.inputs) == 2 for n in g.nodes if n.op == "add")
    monkeypatch.setattr(simulator, "F64_EXACT", f64_exact)
    calls: list[int] = []
    real, real_add = native.requant, native.add_int
    monkeypatch.setattr(native, "requant", lambda *a, **k: calls.append(1) or real(*a, **k))
    adds: list[int] = []
    monkeypatch.setattr(native, "add_int", lambda *a: adds.append(1) or real_add(*a))
    got = Simulator(g).run(x)
    assert bool(calls) == (f64_exact > 0)
    if model == "minifcos" and f64_exact == 0:  # every add through the exact int64 pass
        assert adds
    with native.disabled():
        plain = Simulator(g).run(x)
    for r, s, p in zip(run_ir(g, x.numpy()), got, plain, strict=True):
        assert np.array_equal(r, s.numpy()) and torch.equal(s, p)


@built
@pytest.mark.parametrize("exact", [False, True])
def test_fake_quant_eval_native_epilogue_equals_plain_paths(monkeypatch: pytest.MonkeyPatch,
                                                            exact: bool) -> None:
    from hat_bpu.quant import intmath

    q, x = small_model(width=128, exact=exact)
    calls: list[int] = []
    real = native.requant
    monkeypatch.setattr(native, "requant", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        got = q(x)
        assert calls  # the fast path ran the compiled epilogue
        with native.disabled():
            eager = q(x)
        with intmath.plain_paths():
            plain = q(x)
    got, eager, plain = (t if isinstance(t, tuple) else (t,) for t in (got, eager, plain))
    for a, b, c in zip(got, eager, plain, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


@built
@pytest.mark.parametrize("march", [None, "bayes-e", "bernoulli2"])
def test_int_sum_gives_the_bits_of_the_torch_paths(monkeypatch: pytest.MonkeyPatch, march: str | None,
                                                   isa: str) -> None:
    """The add of 2 and 3 fake-quant inputs: the built pass, the torch fast path and the plain
    path agree bit for bit (values between integers and at saturation included); inputs whose
    integers could make the float64 sum inexact are left to the int64 code."""
    from hat_bpu.quant import intmath

    calls: list[bool] = []
    real = native.int_sum

    def spy(*a: Any) -> torch.Tensor | None:
        out = real(*a)
        calls.append(out is not None)
        return out
    monkeypatch.setattr(native, "int_sum", spy)
    g = torch.Generator().manual_seed(11)
    for trial in range(12):
        xs, scales, s_out = add_inputs(g, march, trial, (2, 6, 5, 7), s_out_floor=0.2)
        xs[0].view(-1)[:8] = (torch.arange(8) - 4.0) * scales[0] * 0.5  # halfway values
        xs = [layout(x, "nhwc") for x in xs]
        clip = (0, 2**15) if trial % 3 == 0 else None
        dtype = "int8" if trial % 2 else "int16"
        with torch.no_grad():
            got = intmath.int_sum(xs, scales, s_out, dtype, clip, march)
            with native.disabled():
                eager = intmath.int_sum(xs, scales, s_out, dtype, clip, march)
            with intmath.plain_paths():
                plain = intmath.int_sum(xs, scales, s_out, dtype, clip, march)
        assert torch.equal(bits(got), bits(eager)) and torch.equal(got, plain), trial
    # served most calls outside native.disabled(); bayes-e's large add multipliers leave some
    # (integers beyond 2**52 / Σ|m|) to the int64 code
    assert sum(calls) >= (12 if march != "bayes-e" else 6)
    big = [torch.full((1, 2, 2, 2), 1e12), torch.ones(1, 2, 2, 2)]  # |integer| beyond the bound
    assert native.int_sum(big, [1.0, 1.0], [2**30, 2**30], [1.0, 1.0], 4, 1.0, -128, 127) is None


@built
@pytest.mark.parametrize(("qmin", "qmax"), [(-128, 127), (0, 127), (-32768, 32767), (0, 48)])
def test_activation_fake_quant_gives_the_torch_bits_and_gradient(qmin: int, qmax: int,
                                                                 isa: str) -> None:
    """QAT's activation fake quant: the built pass against the torch ops it replaces (values,
    the straight-through mask, NaN/inf/ties/signed zeros), forward and backward."""
    from hat_bpu.quant.fake_quant import _FakeQuantSTE

    g = torch.Generator().manual_seed(qmax)
    scale = 0.0371
    x = torch.randn(2, 9, 7, 5, generator=g) * scale * qmax * 1.5
    x.view(-1)[:12] = (torch.arange(12) - 6.0) * scale * 0.5  # ties
    x.view(-1)[12:18] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0,
                                      -scale * 0.3])
    inv = float(np.float32(1.0) / np.float32(scale))
    for t in (x, layout(x, "nhwc")):
        r = (t * inv).round()
        want_q = r.clamp(qmin, qmax)
        want_mask, want = r.eq(want_q), want_q * scale
        got = native.fake_quant(t, inv, qmin, qmax, scale)
        assert got is not None and got[0].stride() == t.stride() == got[1].stride()
        assert torch.equal(bits(got[0]), bits(want))
        assert got[1].dtype == torch.uint8 and torch.equal(got[1], want_mask.to(torch.uint8))
        grad = torch.randn(t.shape, generator=g)
        grad.view(-1)[:4] = torch.tensor([-0.0, float("nan"), -float("inf"), -2.5])
        grad.view(-1)[12:18] = -grad.view(-1)[12:18].abs()  # negatives where the mask is 0 too
        grad = layout(grad, "nhwc" if t.stride() != x.stride() else "nchw")
        masked = native.mask_mul(grad, got[1])  # the backward: grad · mask, signed zeros kept
        assert masked is not None and masked.stride() == grad.stride()
        assert torch.equal(bits(masked), bits(grad * want_mask.float()))
        no_mask = native.fake_quant(t, inv, qmin, qmax, scale, mask=False)  # eval: values only
        assert no_mask is not None and no_mask[1] is None
        assert torch.equal(bits(no_mask[0]), bits(want))
        a = t.clone().requires_grad_(True)
        with native.disabled():
            b = t.clone().requires_grad_(True)
            (_FakeQuantSTE.apply(b, scale, qmin, qmax) * 3.0).nansum().backward()
        out = _FakeQuantSTE.apply(a, scale, qmin, qmax)
        (out * 3.0).nansum().backward()
        assert torch.equal(bits(out.detach()), bits(want)) and torch.equal(a.grad, b.grad)


@built
@pytest.mark.parametrize("nin", [1, 2, 3, 4])
def test_add_int_equals_the_simulators_int64_code(nin: int) -> None:
    """The exact int64 add against the simulator's torch form (``round_shift`` of int64
    products), multipliers up to 2**47, shifts 0..40, ties (multiplier 1, shift 1), clips."""
    g = torch.Generator().manual_seed(nin)
    for trial in range(24):
        sh = [0, 1, 7, 23, 40][trial % 5]
        big = trial % 2 == 0
        ms = [int(torch.randint(1, 2**47 if big else 2**20, (1,), generator=g)) *
              (1 if trial % 3 else -1) for _ in range(nin)]
        if sh == 1:
            ms = [1] * nin  # odd sums land exactly on halves
        xs = [layout(torch.randint(-32768, 32768, (2, 5, 4, 3), generator=g).float(), "nhwc")
              for _ in range(nin)]
        lo, hi = (-128, 127) if trial % 4 else (0, 32767)
        m, s, b, o = simulator._rq_consts(np.asarray(ms[:1]), np.asarray([sh]), ())
        v = sum(x.long() * mi for x, mi in zip(xs, ms, strict=True))
        want = simulator.round_shift(v, s, b, o).clamp(lo, hi).float()
        got = native.add_int(xs, ms, sh, lo, hi)
        assert got is not None and torch.equal(got, want), (trial, sh)


@built
@pytest.mark.parametrize("how", ["nchw", "nhwc"])
@pytest.mark.parametrize("acc_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_res", [False, True])
def test_qat_conv_epilogue_gives_the_torch_bits_forward_and_backward(
        how: str, acc_dtype: torch.dtype, with_res: bool, isa: str) -> None:
    """QAT's conv epilogue (``intmath._ConvEpilogue``): the built forward (values, one-byte
    mask), backward (accumulator, bias and residual gradients) and range peak against the
    torch ops, with ties, saturation, NaN/inf and signed zeros."""
    from hat_bpu.quant.intmath import _ConvEpilogue, _epilogue_terms

    g = torch.Generator().manual_seed(7 + with_res)
    shape, c = (2, 6, 5, 7), 6
    acc = torch.randint(-4000, 4000, shape, generator=g).to(acc_dtype)
    acc.view(-1)[:5] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e9, -1e9])
    acc = layout(acc, how)
    bi = torch.randint(-300, 300, (1, c, 1, 1), generator=g).double()
    mult = torch.tensor([2**-4, 2**-3, 0.0371, 1e-3, 0.7, 2**-6], dtype=torch.float64
                        ).reshape(1, c, 1, 1)  # 2**-k: exact ties
    s_res, res, mult_res = 0.0625, None, None
    if with_res:
        res = torch.randint(-128, 128, shape, generator=g).float() * s_res
        res.view(-1)[5:9] = torch.tensor([0.5, -1.5, 2.5, -0.0]) * s_res  # ties of res / s_res
        res = layout(res, how)
        mult_res = torch.tensor([0.5, 0.25, 0.9, 2**-5, 1.0, 0.125], dtype=torch.float64
                                ).reshape(1, c, 1, 1)
    s_out = torch.tensor(0.05, dtype=torch.float32)
    grad = torch.randn(shape, generator=g)
    grad.view(-1)[:3] = torch.tensor([-0.0, float("nan"), -2.0])
    grad = layout(grad, how)

    def run(built: bool) -> list[torch.Tensor]:
        a_ = acc.clone().requires_grad_(True)
        b_ = bi.clone().requires_grad_(True)
        r_ = None if res is None else res.clone().requires_grad_(True)
        with native.disabled(not built):
            a, ri = (None, None) if built else _epilogue_terms(a_, b_, r_, s_res)
            out = _ConvEpilogue.apply(a_, b_, a, mult, r_, ri, s_res if with_res else None,
                                      mult_res, -128, 127, s_out)
            out.backward(grad)
        assert a_.grad is not None and b_.grad is not None
        return [out.detach(), a_.grad, b_.grad] + ([] if r_ is None else [r_.grad])

    want, got = run(False), run(True)
    for w, o in zip(want, got, strict=True):
        assert w.dtype == o.dtype and w.stride() == o.stride()
        as_int = torch.int32 if w.dtype == torch.float32 else torch.int64
        assert torch.equal(w.contiguous().view(as_int), o.contiguous().view(as_int))
    served = native.requant_train(acc, bi, mult, -128, 127, float(s_out), res, mult_res,
                                  s_res if with_res else None)
    assert served is not None and served[1].dtype == torch.uint8  # the built pass did serve
    a, ri = _epilogue_terms(acc, bi, res, s_res)
    v = a * mult + (0 if ri is None else ri * mult_res)
    assert torch.equal(served[1].bool(), v.round() == v.round().clamp(-128, 127))
    # the range update's peak: min and max of the float pre-activation (NaN when some is)
    scale = torch.tensor([0.01, 0.02, 0.5, 1e-4, 3.0, 0.125], dtype=torch.float64)
    fin = acc.nan_to_num(0.0, 0.0, 0.0)
    y = (fin.double() + bi) * scale.reshape(1, c, 1, 1)
    if ri is not None:
        y = y + ri * s_res
    pk = native.peak(fin, bi, scale, res, s_res if with_res else None,
                     s_res if with_res else None)
    assert pk == (float(y.min()), float(y.max()))
    nan_pk = native.peak(acc, bi, scale, res, s_res if with_res else None,
                         s_res if with_res else None)
    assert nan_pk is not None and all(np.isnan(v_) for v_ in nan_pk)


@built
@pytest.mark.parametrize("how", ["nchw", "nhwc", "wide"])
def test_the_threaded_split_gives_the_bits_of_one_thread(how: str, isa: str) -> None:
    """Each built pass over 2**16 elements or more splits over threads (OpenMP): with 1, 2 and 3
    threads every output is the same bits (and the epilogue's are the torch expression's), the
    peak the same min/max. NCHW planes, NHWC rows of 24 channels, rows of 1100 (> a span)."""
    if native._native.set_threads(2) == 1:
        pytest.skip("built without OpenMP")
    g = torch.Generator().manual_seed(11)
    shape = (3, 1100, 11, 9) if how == "wide" else (3, 24, 67, 61)  # uneven splits
    c = shape[1]

    def lay(t: torch.Tensor) -> torch.Tensor:
        return layout(t, "nchw" if how == "nchw" else "nhwc")

    acc = torch.randint(-2**20, 2**20, shape, generator=g).float()
    acc.view(-1)[:4] = torch.tensor([4.0, 12.0, -4.0, float("nan")])  # ties, NaN
    acc = lay(acc)
    bias = torch.randint(-5000, 5000, (c,), generator=g).double()
    mult = torch.rand(c, generator=g, dtype=torch.float64) * 2.0**-10
    mult[:2] = 2.0**-3
    res = lay(torch.randint(-128, 128, shape, generator=g).float() * 0.0625)
    res_mult = torch.rand(c, generator=g, dtype=torch.float64)
    x = lay(torch.randn(shape, generator=g) * 3.0)
    grad = lay(torch.randn(shape, generator=g))
    mask = lay((torch.rand(shape, generator=g) > 0.3).to(torch.uint8))
    big = [lay(torch.randint(-128, 128, shape, generator=g).float() * s) for s in (0.05, 0.02)]
    assert acc.numel() >= 2**17

    def outputs() -> list[Any]:
        b4 = bias.reshape(1, -1, 1, 1)
        m4, rm4 = mult.reshape(1, -1, 1, 1), res_mult.reshape(1, -1, 1, 1)
        rq = native.requant(acc, bias, mult, -128, 127, res, res_mult, out_scale=0.03,
                            res_div=0.0625)
        tr = native.requant_train(acc, b4, m4, -128, 127, 0.03, res, rm4, 0.0625)
        gr = native.requant_train_grad(grad, mask, 0.03, m4, torch.float32, True, rm4, 0.0625)
        pk = native.peak(acc.nan_to_num(0.0), b4, mult, res, 0.0625, 0.0625)
        qz = native.quantize(x, 0.05)
        fqo = native.fake_quant(x, 20.0, -128, 127, 0.05)
        mm = native.mask_mul(grad, mask)
        sm = native.int_sum(big, [0.05, 0.02], [3, 5], [0.4, 0.1], 4, 0.07, -128, 127)
        ai = native.add_int([b.div(s).round() for b, s in zip(big, (0.05, 0.02), strict=True)],
                            [3, -5], 2, -128, 127)
        parts = [rq, tr, gr, qz, fqo, mm, sm, ai]
        assert all(p is not None for p in parts)
        return [pk] + [t for p in parts for t in (p if isinstance(p, tuple) else (p,))]

    with native.threads(1):
        one = outputs()
    want = torch_epilogue(acc, bias, mult, -128, 127,
                          (res / 0.0625).round(), res_mult, 0.03)
    assert torch.equal(bits(one[1]), bits(want))
    for n in (2, 3):
        with native.threads(n):
            split = outputs()
        assert split[0] == one[0]
        for a, b in zip(one[1:], split[1:], strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                assert a.dtype == b.dtype and a.stride() == b.stride()
                assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
