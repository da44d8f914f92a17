"""The QAT training fast paths (``intmath.fast_train_paths``) give the plain paths' losses,
outputs, gradients, parameters, BN statistics and scales bit for bit, step after step."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from deploy_fixtures import spread_bn
from deploy_fixtures import yuv_input as yuv
from example_net import MiniFCOS, SmallNet, conv_bn
from hat_bpu.quant import intmath, qspec
from hat_bpu.quant.fake_quant import QConv2d
from hat_bpu.quant.prepare import QConfig, prepare
from torch import nn
from torch.nn import functional as F
from torch.utils import _pytree as pytree

from hatcore import quant
from hatcore.quant import DeQuantStub, QuantStub, set_hint


class ResNet(nn.Module):
    """Fused residual adds (conv + BN + add + relu), an int16 layer feeding a conv (float64
    accumulation), a standalone add and a conv without BN."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = QuantStub(scale=1 / 128)
        self.stem = nn.Sequential(*conv_bn(3, 16, 3, 2), nn.ReLU())
        self.a = nn.Sequential(*conv_bn(16, 16, 3, 1), nn.ReLU(), *conv_bn(16, 16, 3, 1))
        self.mid = nn.Sequential(*conv_bn(16, 16, 1))
        set_hint(self.mid[0], out_dtype="int16")
        self.b = nn.Sequential(*conv_bn(16, 16, 3, 1))
        self.out = nn.Conv2d(16, 5, 1)
        self.dequant = DeQuantStub()

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.quant(img))
        x = F.relu(self.a(x) + x)
        x = F.relu(self.b(self.mid(x)) + x)
        return self.dequant(self.out(x))


NETS = {"smallnet": lambda: SmallNet(width=16), "minifcos": lambda: MiniFCOS(width=8),
        "resnet": ResNet}


def qat_model(name: str, frozen_bn: bool, pow2: bool, channels_last: bool) -> nn.Module:
    torch.manual_seed(0)
    net = NETS[name]().eval()
    spread_bn(net)  # non-trivial BN statistics
    q = prepare(net, QConfig(pow2=pow2, march="bayes-e"))
    quant.set_mode(q, "observe")
    with torch.no_grad():
        q(yuv(4, 32, 1))
    quant.set_mode(q, "qat")
    if frozen_bn:
        for c in q.modules():
            if isinstance(c, QConv2d):
                c.freeze_bn()
    if channels_last:
        q = q.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return q.train()


def leaves(out: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def train(q: nn.Module, plain: bool, steps: int, channels_last: bool) -> list[list[torch.Tensor]]:
    """``steps`` SGD steps on fixed batches; every output, loss and gradient of every step."""
    opt = torch.optim.SGD(q.parameters(), lr=0.01, momentum=0.9)
    record: list[list[torch.Tensor]] = []
    with intmath.plain_paths(plain):
        for i in range(steps):
            x = yuv(4, 32, 10 + i)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            outs = leaves(q(x))
            loss = sum(o.float().square().mean() for o in outs)
            assert isinstance(loss, torch.Tensor)
            opt.zero_grad()
            loss.backward()
            grads = [p.grad for p in q.parameters() if p.grad is not None]
            record.append([o.detach().clone() for o in outs] + [loss.detach()]
                          + [g.clone() for g in grads])
            opt.step()
    return record


def identical(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) > 0 and all(
        u.dtype == v.dtype and u.shape == v.shape and torch.equal(u, v)
        for u, v in zip(a, b, strict=True))


@pytest.mark.parametrize("name", sorted(NETS))
@pytest.mark.parametrize(("frozen_bn", "pow2", "channels_last"),
                         [(False, False, True), (True, False, True), (True, True, False),
                          (False, False, False)])
def test_qat_fast_paths_equal_plain(name: str, frozen_bn: bool, pow2: bool,
                                    channels_last: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    base = qat_model(name, frozen_bn, pow2, channels_last)
    plain_q, fast_q = copy.deepcopy(base), copy.deepcopy(base)
    calls = {"fused": 0, "plain": 0}
    for fn, key in (("int_conv_train", "fused"), ("int_conv", "plain")):
        orig = getattr(intmath, fn)

        def counted(*a: Any, _orig: Any = orig, _key: str = key, **k: Any) -> Any:
            calls[_key] += 1
            return _orig(*a, **k)

        monkeypatch.setattr(intmath, fn, counted)
    steps = 3
    plain_rec = train(plain_q, True, steps, channels_last)
    assert calls == {"fused": 0, "plain": calls["plain"]} and calls["plain"] > 0
    calls["plain"] = 0
    fast_rec = train(fast_q, False, steps, channels_last)
    assert calls["fused"] > 0 and calls["plain"] == 0  # the fused path ran, the plain did not
    for i in range(steps):  # outputs, loss, gradients of every step
        assert identical(plain_rec[i], fast_rec[i]), f"step {i}"
    state_p, state_f = plain_q.state_dict(), fast_q.state_dict()  # weights, BN stats, scales
    assert state_p.keys() == state_f.keys()
    assert identical(list(state_p.values()), list(state_f.values()))
    assert not torch.equal(state_p[next(iter(state_p))], base.state_dict()[next(iter(state_p))]) \
        or any(not torch.equal(v, base.state_dict()[k]) for k, v in state_p.items())  # it trained


@pytest.mark.parametrize("name", sorted(NETS))
@pytest.mark.parametrize("frozen_bn", [False, True])
def test_qat_fast_paths_built_and_torch_passes_agree(name: str, frozen_bn: bool) -> None:
    """The fast paths with hat-bpu's built passes (QAT's conv epilogue, its backward and range
    peak, the activation fake quant and its backward) and without them (their torch ops) train
    to the same bits; and the built ones did serve where the extension is built."""
    from hat_bpu import native

    base = qat_model(name, frozen_bn, False, True)
    torch_q, built_q = copy.deepcopy(base), copy.deepcopy(base)
    with native.disabled():
        torch_rec = train(torch_q, False, 2, True)
    served = {"requant_train": 0, "requant_train_grad": 0, "fake_quant": 0}
    originals = {k: getattr(native, k) for k in served}

    def counting(key: str) -> Any:
        def call(*a: Any, **k: Any) -> Any:
            out = originals[key](*a, **k)
            served[key] += out is not None
            return out
        return call

    try:
        for k in served:
            setattr(native, k, counting(k))
        built_rec = train(built_q, False, 2, True)
    finally:
        for k, fn in originals.items():
            setattr(native, k, fn)
    if native.available():  # (with live BN only the nets' last convs run the integer form,
        # their gradients laid out otherwise than their outputs: the torch backward serves)
        assert served["requant_train"] > 0 and served["fake_quant"] > 0, served
        assert served["requant_train_grad"] > 0 or not frozen_bn, served
    for i in range(2):
        assert identical(torch_rec[i], built_rec[i]), f"step {i}"
    assert identical(list(torch_q.state_dict().values()), list(built_q.state_dict().values()))


def test_dense_view_reduces_like_the_tensor() -> None:
    x = torch.randn(2, 5, 7, 3).contiguous(memory_format=torch.channels_last)
    v = intmath.dense_view(x)
    assert v.is_contiguous() and v.data_ptr() == x.data_ptr()
    assert torch.equal(v.max(), torch.tensor(x.tolist()).max())
    assert intmath.dense_view(x.contiguous()).shape == x.shape  # contiguous: unchanged


def test_requant_mults_equal_requant_params() -> None:
    """The fast multiplier skips requant_params' trailing-zero strip: same m / 2**s."""
    g = np.random.default_rng(0)
    ratios = np.concatenate([
        np.exp2(g.uniform(-70, 29.9, 4000)),  # the whole range, MAX_SHIFT included
        np.exp2(np.arange(-70, 30, dtype=np.float64)),  # powers of two: m = 1 after the strip
        np.nextafter(np.exp2(np.arange(-40, 30, dtype=np.float64)), 0),  # just below them
        g.uniform(0.001, 0.1, 1000).astype(np.float32).astype(np.float64)])
    m, s = qspec.requant_params(ratios)
    assert np.array_equal(intmath.requant_mults(ratios), m / np.exp2(s.astype(np.float64)))
    with pytest.raises(ValueError):
        intmath.requant_mults(np.array([0.5, -1.0]))
