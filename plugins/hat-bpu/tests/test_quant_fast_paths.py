"""The no-grad eval fast paths of fake quant give the plain paths' values bit for bit, and the
eval cache of the conv integers never outlives a change of what it was built from."""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from deploy_fixtures import add_inputs, spread_bn
from deploy_fixtures import yuv_input as yuv
from example_net import MiniFCOS, SmallNet, conv_bn
from hat_bpu import native
from hat_bpu.ir.reference import run_ir
from hat_bpu.quant import intmath
from hat_bpu.quant.convert import convert
from hat_bpu.quant.fake_quant import QConv2d
from hat_bpu.quant.prepare import QConfig, prepare
from torch import nn
from torch.nn import functional as F
from torch.utils import _pytree as pytree

from hatcore import quant
from hatcore.quant import DeQuantStub, QuantStub, set_hint


class WideNet(nn.Module):
    """Long int8 reductions (3×3 over 160 channels: K = 1440, float32 not provably exact), an
    int16 activation feeding a conv (float64 accumulation) and a fused residual."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = QuantStub(scale=1 / 128)
        self.stem = nn.Sequential(*conv_bn(3, 160, 3, 1), nn.ReLU())
        self.wide = nn.Sequential(*conv_bn(160, 24, 3, 1), nn.ReLU())
        self.mid = nn.Sequential(*conv_bn(24, 24, 1))
        set_hint(self.mid[0], out_dtype="int16")
        self.after16 = nn.Sequential(*conv_bn(24, 24, 3, 1))
        self.out = nn.Conv2d(24, 5, 1)
        self.dequant = DeQuantStub()

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = self.wide(self.stem(self.quant(img)))
        x = F.relu(self.after16(self.mid(x)) + x)
        return self.dequant(self.out(x))


NETS: dict[str, Callable[[], nn.Module]] = {
    "smallnet": lambda: SmallNet(width=16), "minifcos": lambda: MiniFCOS(width=8),
    "widenet": WideNet}


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = NETS[name]().eval()
    spread_bn(net)  # non-trivial BN statistics
    return net


def ready(net: nn.Module, x: torch.Tensor, config: QConfig) -> nn.Module:
    """Prepare, calibrate on ``x``, switch to fake quant, eval."""
    q = prepare(net.eval(), config)
    quant.set_mode(q, "observe")
    with torch.no_grad():
        q(x)
    quant.set_mode(q, "fake_quant")
    return q.eval()


def leaves(out: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def fast(q: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with intmath.plain_paths(False), torch.no_grad():
        return leaves(q(x))


def plain(q: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with intmath.plain_paths(), torch.no_grad():
        return leaves(q(x))


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) > 0 and all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def qconvs(q: nn.Module) -> list[QConv2d]:
    return [m for m in q.modules() if isinstance(m, QConv2d)]


@pytest.mark.parametrize("name", sorted(NETS))
@pytest.mark.parametrize(("exact", "pow2"), [(False, False), (True, False), (True, True)])
def test_fast_paths_equal_plain_paths(name: str, exact: bool, pow2: bool) -> None:
    x = yuv(2, 32)
    q = ready(build(name), x, QConfig(exact_eval=exact, pow2=pow2, march="bayes-e"))
    got = fast(q, x)
    assert all(c._ints for c in qconvs(q) if c.out_fq is not None)  # the fast path ran
    assert same(got, plain(q, x))
    with torch.enable_grad():  # gradients on: the autograd path, whatever the switch says
        assert same(got, leaves(q(x)))
    assert same(fast(q, x), got)  # from the cache


def test_exact_chunks_are_exact_where_float32_would_round() -> None:
    torch.manual_seed(3)
    net = build("widenet")
    with torch.no_grad():  # equal stem channels at the int8 maximum times the maximal weights:
        net.stem[0].weight.fill_(0.1)  # accumulators 1440·127·127 > 2**24 inside the image
        net.stem[1].running_mean.zero_()
        net.stem[1].running_var.fill_(1.0)
        net.stem[1].weight.fill_(1.0)
        net.stem[1].bias.zero_()
        net.wide[0].weight.uniform_(0.9, 1.0)
    x = yuv(1, 16).abs().add(0.5).clamp(max=1.0)
    q = ready(net, x, QConfig(exact_eval=True))
    wide = next(c for c in qconvs(q) if c.conv.in_channels == 160)
    seen: list[torch.Tensor] = []
    hook = wide.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    got = fast(q, x)
    hook.remove()
    ints = next(iter(wide._ints.values()))[2]
    assert ints.chunks is not None and max(ints.chunks) * 9 <= intmath.F32_CHUNK
    s_in = float(wide.in_fq[0].scale)
    xi = torch.round(seen[0].double() / s_in)
    acc = F.conv2d(xi, ints.weight.double(), None, 1, 1)
    assert float(acc.abs().max()) > 2**24
    one_conv = F.conv2d(xi.float(), ints.weight, None, 1, 1)  # one float32 conv rounds here
    assert not torch.equal(one_conv.double(), acc)
    assert same(got, plain(q, x))  # plain: a float64 conv
    graph = convert(q, x)  # the integer model
    ref = run_ir(graph, x.numpy())
    assert all((torch.from_numpy(r) == g).all() for r, g in zip(ref, got, strict=True))


def fresh_copy(q: nn.Module, name: str, x: torch.Tensor, config: QConfig) -> nn.Module:
    """A newly built, prepared model carrying ``q``'s state dict (no cache history)."""
    f = ready(build(name, seed=1), x, config)
    f.load_state_dict(q.state_dict())
    return f.eval()


def _weight_data(q: nn.Module) -> None:
    qconvs(q)[1].conv.weight.data.mul_(1.7)  # in place through .data: no version bump


def _bn_stats(q: nn.Module) -> None:
    bn = next(c.bn for c in qconvs(q) if c.bn is not None)
    with torch.no_grad():
        bn.running_mean.add_(0.3)
        bn.running_var.mul_(0.5)


def _new_parameter(q: nn.Module) -> None:
    c = qconvs(q)[0]
    c.conv.weight = nn.Parameter(c.conv.weight.detach() * -1.0)


def _scale(q: nn.Module) -> None:
    c = qconvs(q)[2]
    assert c.out_fq is not None
    with torch.no_grad():
        c.out_fq.scale.mul_(1.5)


def _optimizer_step(q: nn.Module) -> None:
    opt = torch.optim.SGD(q.parameters(), lr=0.5)
    for p in q.parameters():
        p.grad = torch.ones_like(p)
    opt.step()


def _load_other(q: nn.Module) -> None:
    other = ready(build("smallnet", seed=7), yuv(2, 32, seed=1), QConfig(exact_eval=True))
    q.load_state_dict(other.state_dict())


CHANGES = {"weight_data": _weight_data, "bn_stats": _bn_stats, "new_parameter": _new_parameter,
           "scale": _scale, "optimizer_step": _optimizer_step, "load_state_dict": _load_other}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_cache_never_stale(change: str) -> None:
    config = QConfig(exact_eval=True)
    x = yuv(2, 32)
    q = ready(build("smallnet"), x, config)
    before = fast(q, x)
    CHANGES[change](q)
    after = fast(q, x)
    assert not same(after, before)  # the change matters...
    ref = fresh_copy(q, "smallnet", x, config)
    assert same(after, plain(ref, x))  # ...and the output follows it
    assert same(after, fast(ref, x))


def test_cache_follows_modes_and_train() -> None:
    config = QConfig(exact_eval=True)
    x = yuv(2, 32)
    q = ready(build("smallnet"), x, config)
    fq = fast(q, x)
    quant.set_mode(q, "observe")  # float outputs (observers record)
    assert all(not c._ints for c in qconvs(q))
    float_out = fast(q, x)
    assert not same(float_out, fq)
    quant.set_mode(q, "qat")
    q.train()
    assert all(not c._ints for c in qconvs(q))
    opt = torch.optim.SGD(q.parameters(), lr=0.05)
    loss = sum(t.square().mean() for t in leaves(q(x)))
    loss.backward()
    opt.step()
    q.eval()
    assert same(fast(q, x), plain(q, x))
    ref = fresh_copy(q, "smallnet", x, config)
    quant.set_mode(ref, "qat")
    assert same(fast(q, x), plain(ref.eval(), x))
    quant.set_mode(q, "fake_quant")
    assert same(fast(q, x), plain(q, x))


def test_deepcopy_and_plain_switch() -> None:
    x = yuv(2, 32)
    q = ready(build("minifcos"), x, QConfig(exact_eval=True))
    got = fast(q, x)
    c = copy.deepcopy(q)
    with torch.no_grad():
        for p in c.parameters():
            p.mul_(0.9)
    assert not same(fast(c, x), got)
    assert same(fast(c, x), plain(c, x))
    assert same(fast(q, x), got)
    with intmath.plain_paths():
        assert not intmath.fast_paths()
        with intmath.plain_paths(False), torch.no_grad():
            assert intmath.fast_paths()
    with intmath.plain_paths(False):
        assert not intmath.fast_paths()  # gradients on


@pytest.mark.parametrize("march", [None, "bayes-e", "bernoulli2"])
@pytest.mark.parametrize("dtype", ["int8", "int16"])
def test_int_sum_fast_equals_plain(march: str | None, dtype: str) -> None:
    g = torch.Generator().manual_seed(5)
    for trial in range(20):
        xs, scales, s_out = add_inputs(g, march, trial, (2, 4, 9, 9))
        clip = (0, 2**15) if trial % 3 == 0 else None
        with torch.no_grad():
            got = intmath.int_sum(xs, scales, s_out, dtype, clip, march)
            with intmath.plain_paths():
                ref = intmath.int_sum(xs, scales, s_out, dtype, clip, march)
        assert torch.equal(got, ref), (trial, scales, s_out)
        assert torch.equal(got.sign(), ref.sign())


@pytest.mark.slow
def test_compiled_epilogue_equals_plain() -> None:
    """``torch.compile``'s fused epilogue (opt-in): the same values (tens of seconds to compile
    on a cold cache; a machine that cannot compile falls back to eager with a warning). It
    serves only where the built epilogue (hat_bpu.native) does not: that one is off here."""
    x = yuv(2, 32)
    nets = [ready(build(n), x, QConfig(exact_eval=True)) for n in ("smallnet", "widenet")]
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(native.disabled())
        intmath.compile_epilogue(True)
        for q in nets:
            with warnings.catch_warnings():
                warnings.simplefilter("error", UserWarning)  # a failed compile is a failure here
                got = fast(q, x)
            assert same(got, plain(q, x))
        assert callable(intmath._fused_epilogue())
    finally:
        stack.close()
        intmath.compile_epilogue(False)
