"""Fake quant equals torch's reference ops, gradients are straight-through, fusion is exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from example_net import SmallNet
from hat_bpu.quant import qspec
from hat_bpu.quant.fake_quant import ActFQ, QConv2d, fake_quant_weight
from hat_bpu.quant.prepare import prepare
from torch import nn
from torch.nn import functional as F

from hatcore import quant
from hatcore.errors import UserError


def test_activation_fake_quant_equals_torch() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 8, 5, 5) * 3
    fq = ActFQ("int8", "minmax")
    fq.hat_set_mode("observe")
    fq(x)
    fq.hat_set_mode("fake_quant")
    scale = float(fq.scale)
    assert scale == float(x.abs().max() / 127)
    ref = torch.fake_quantize_per_tensor_affine(x, scale, 0, -128, 127)
    assert torch.equal(fq(x), ref)
    fq16 = ActFQ("int16", fixed_scale=0.01)
    fq16.hat_set_mode("fake_quant")
    assert torch.equal(fq16(x), torch.fake_quantize_per_tensor_affine(x, 0.01, 0, -32768, 32767))


def test_weight_fake_quant_equals_torch_per_channel() -> None:
    torch.manual_seed(1)
    w = torch.randn(6, 3, 3, 3)
    got, scale = fake_quant_weight(w, "int8", pow2=False)
    assert torch.allclose(scale, w.abs().flatten(1).amax(1) / 127)
    ref = torch.fake_quantize_per_channel_affine(w, scale, torch.zeros(6, dtype=torch.int32), 0,
                                                 -128, 127)
    assert torch.equal(got, ref)


def test_straight_through_gradients() -> None:
    fq = ActFQ("int8", fixed_scale=0.1)
    fq.hat_set_mode("qat")
    x = torch.tensor([-20.0, -1.23, 0.0, 5.55, 12.69, 12.8, 30.0], requires_grad=True)
    fq(x).sum().backward()
    inside = (x.detach() >= -12.8) & (x.detach() <= 12.7)
    assert torch.equal(x.grad, inside.float())


def test_pow2_scales_only_on_bernoulli() -> None:
    # Horizon's pow_quantization() is true only for March.BERNOULLI (X2/J2)
    from hat_bpu.plugin import HorizonQuantizeSpec, qconfig_from_spec

    cfg = qconfig_from_spec(HorizonQuantizeSpec(type="horizon"), "bernoulli")
    assert cfg.pow2 and cfg.march == "bernoulli"
    for march in ("bernoulli2", "bayes", "bayes-e"):
        assert not qconfig_from_spec(HorizonQuantizeSpec(type="horizon"), march).pow2
    with pytest.raises(UserError, match="bernoulli2"):
        qconfig_from_spec(HorizonQuantizeSpec(type="horizon"), "bernouli2")
    torch.manual_seed(0)
    q = prepare(SmallNet().eval(), cfg)
    quant.set_mode(q, "observe")
    q(torch.rand(2, 3, 16, 16))
    quant.set_mode(q, "fake_quant")
    scales = [float(m.scale) for m in q.modules() if isinstance(m, ActFQ)]
    assert len(scales) >= 7 and all(qspec.is_pow2(s) for s in scales)
    conv = q.qgraph.get_submodule("stem.0")
    _, w_scale = fake_quant_weight(conv.folded()[0], "int8", pow2=True)
    assert all(qspec.is_pow2(float(s)) for s in w_scale)


def test_fused_conv_bn_equals_conv_then_bn() -> None:
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(4, 6, 3, 2, 1, bias=True), nn.BatchNorm2d(6)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.2, 3)
    bn.weight.data.uniform_(0.3, 2)
    bn.bias.data.uniform_(-1, 1)
    bn.eval()
    x = torch.randn(2, 4, 9, 9)
    w, b = QConv2d(conv, bn, "none", False, None).folded()
    fused = torch.nn.functional.conv2d(x, w, b, 2, 1)
    assert (fused - bn(conv(x))).abs().max() < 1e-5


def test_round_shift_is_round_half_to_even() -> None:
    v = np.arange(-4096, 4096)
    for s in range(0, 8):
        assert np.array_equal(qspec.round_shift(v, s), np.rint(v / 2.0**s).astype(np.int64))
    m, s = qspec.requant_params(np.array([0.25, 3.0e-3, 0.7]))
    assert m[0] == 1 and s[0] == 2  # a power-of-two ratio is a pure shift
    assert np.all(np.abs(m / 2.0**s / np.array([0.25, 3.0e-3, 0.7]) - 1) < 2.0**-29)


def test_fused_activation_fake_quant_equals_act_then_torch() -> None:
    torch.manual_seed(2)
    x = (torch.randn(2, 4, 6, 6) * 5).requires_grad_()
    for act, fn in (("relu", torch.relu), ("relu6", torch.nn.functional.relu6)):
        fq = ActFQ("int8", fixed_scale=0.06)
        fq.hat_set_mode("qat")
        got = fq(x, act)
        ref = torch.fake_quantize_per_tensor_affine(fn(x), 0.06, 0, -128, 127)
        assert torch.equal(got, ref)
        (g_got,) = torch.autograd.grad(got.sum(), x)
        (g_ref,) = torch.autograd.grad(ref.sum(), x)
        differ = (g_got != g_ref).float().mean()  # only within half an LSB below 0
        assert differ < 0.02


def test_pow2_scales_are_restored_when_fake_quant_starts() -> None:
    fq = ActFQ("int8", "minmax", pow2=True)
    fq.hat_set_mode("observe")
    fq(torch.tensor([3.0]))
    fq.hat_set_mode("qat")
    assert float(fq.scale) == 2.0**-5
    fq.scale.mul_(0.9)  # as an EMA of the weights and buffers might leave it
    fq.hat_set_mode("fake_quant")
    assert float(fq.scale) == 2.0**-5


def test_torch_round_shift_equals_numpy_rule() -> None:
    rng = np.random.default_rng(0)
    v = rng.integers(-(2**40), 2**40, size=20000)
    s = rng.integers(0, 40, size=20000)
    got = qspec.round_shift_torch(torch.from_numpy(v), torch.from_numpy(s)).numpy()
    assert np.array_equal(got, qspec.round_shift(v, s))


def test_integer_conv_gradients_are_straight_through() -> None:
    """QAT with BN folded runs the device's integer conv; its gradients equal those of torch's
    float fake quant with the ReLU fused as ``quant_min = 0`` (``fq_out(conv(x, fq_w(w)) + b)``,
    as ActFQ does it), computed here with torch's own
    fake-quant ops), and its values agree with it (they differ only at rounding near-ties)."""
    torch.manual_seed(3)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    out_fq = ActFQ("int8", fixed_scale=0.05)
    mod = QConv2d(conv, None, "relu", False, out_fq)
    in_fq = ActFQ("int8", fixed_scale=1 / 64)
    mod.in_fq = [in_fq]
    for m in (mod, out_fq, in_fq):
        m.hat_set_mode("qat")
    x = torch.fake_quantize_per_tensor_affine(torch.randn(2, 4, 8, 8), 1 / 64, 0, -128, 127)
    x.requires_grad_(True)
    g = torch.randn(2, 6, 8, 8)
    (mod(x) * g).sum().backward()
    got_w, got_x, got_b = conv.weight.grad.clone(), x.grad.clone(), conv.bias.grad.clone()
    conv.weight.grad = conv.bias.grad = x.grad = None

    w = conv.weight
    s_w = (w.detach().abs().flatten(1).amax(1) / 127)
    wq = torch.fake_quantize_per_channel_affine(w, s_w, torch.zeros(6, dtype=torch.int32), 0,
                                                -128, 127)
    y = F.conv2d(x, wq, conv.bias, padding=1)
    ref = torch.fake_quantize_per_tensor_affine(y, 0.05, 0, 0, 127)  # relu fused: quant_min 0
    (ref * g).sum().backward()
    with torch.no_grad():
        diff = (mod(x) - ref).abs() / 0.05
    assert float((diff < 0.5).float().mean()) > 0.99 and float(diff.max()) <= 1.0 + 1e-4
    assert torch.allclose(got_w, conv.weight.grad, rtol=1e-3, atol=1e-3)
    assert torch.allclose(got_x, x.grad, rtol=1e-3, atol=1e-4)
    assert torch.allclose(got_b, conv.bias.grad, rtol=1e-3, atol=1e-3)


def test_exact_eval_is_opt_in_and_labels_the_model() -> None:
    from hat_bpu.plugin import HorizonQuantizeSpec, quantize_model

    assert HorizonQuantizeSpec(type="horizon").exact_eval is False
    net = SmallNet().eval()
    plain = quantize_model(net, HorizonQuantizeSpec(type="horizon"), "calibration")
    exact = quantize_model(net, HorizonQuantizeSpec(type="horizon", exact_eval=True), "qat")
    assert plain.hat_arithmetic == "fake quant" and exact.hat_arithmetic == "integer"


def test_a_dead_channel_keeps_its_bias_instead_of_saturating() -> None:
    """Weights ~0 next to a live bias used to give s_w = 1e-12 and an int32 bias clipped at
    2**31 - 1 (the seed's 29 saturated convs); the weight scale is raised so the bias fits."""
    from hat_bpu.quant import intmath

    w = torch.zeros(2, 3, 1, 1)
    w[1] = 0.25
    b = torch.tensor([5.0, -1.0])
    s_in, s_out = 1 / 128, 0.05
    p = intmath.conv_params(w, b, False, s_in, s_out, None)
    assert qspec.bias_overflows(b.numpy(), s_in, p["w_scale"]) == 0
    acc_scale = np.float32(s_in) * p["w_scale"].astype(np.float32)
    assert abs(float(p["bias"][0]) * float(acc_scale[0]) - 5.0) < 1e-6  # the bias survives
    assert p["w_scale"][1] == np.float32(0.25 / 127)  # a live channel keeps max|w| / 127
    assert int(np.abs(p["weight"][0]).max()) == 0
