"""Integer conversion: the IR executed with integers agrees with the fake-quant model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from deploy_fixtures import spread_bn
from example_net import SmallNet
from hat_bpu.ir.reference import run_ir
from hat_bpu.quant import qspec
from hat_bpu.quant.convert import convert
from hat_bpu.quant.prepare import QConfig, prepare
from torch.nn import functional as F

from hatcore import quant
from hatcore.errors import UserError


def yuv(n: int, size: int) -> torch.Tensor:
    """Inputs as the BPU sees them: (p - 128) / 128 for pixels p in 0..255."""
    return torch.randint(0, 256, (n, 3, size, size)).float().sub(128).div(128)


def ready(net: torch.nn.Module, x: torch.Tensor, config: QConfig) -> torch.nn.Module:
    """Prepare ``net``, calibrate it on ``x`` and switch it to fake quant."""
    q = prepare(net.eval(), config)
    quant.set_mode(q, "observe")
    q(x)
    quant.set_mode(q, "fake_quant")
    return q


def calibrated(pow2: bool = False, seed: int = 0, exact: bool = True
               ) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    net = SmallNet().eval()
    spread_bn(net)  # non-trivial BN statistics
    x = yuv(4, 16)
    q = ready(net, x, QConfig(pow2=pow2, exact_eval=exact))
    return q, x


@pytest.mark.parametrize(("pow2", "exact"), [(False, True), (True, True), (False, False)])
def test_integer_graph_matches_fake_quant(pow2: bool, exact: bool) -> None:
    q, x = calibrated(pow2, exact=exact)
    graph = convert(q, x[:1])
    ops = {n.op for n in graph.nodes}
    assert {"quantize", "conv2d", "concat", "maxpool", "upsample_nearest", "dequantize"} <= ops
    assert any(len(n.inputs) == 2 for n in graph.nodes if n.op == "conv2d")  # fused residual
    with torch.no_grad():
        ref = q(x)
    got = run_ir(graph, x.numpy())
    for r, g, name in zip(ref, got, graph.outputs, strict=True):
        t = graph.tensors[graph.producer(name).inputs[0]]
        # fake quant computes the device's integers (exact_eval or not: every reduction here
        # is short enough for float32 to be exact), so the outputs are equal bit for bit
        assert np.array_equal(g, r.numpy()), (name, t.dtype)
    assert graph.tensors[graph.producer(graph.outputs[1]).inputs[0]].dtype == "int16"
    if pow2:
        assert all(qspec.is_pow2(t.scale) for t in graph.tensors.values() if t.scale)
    assert graph.unflatten_outputs(got)[0] is got[0]


def test_float_kept_layer_refuses_export() -> None:
    torch.manual_seed(0)
    q = ready(SmallNet().eval(), torch.rand(1, 3, 16, 16), QConfig(overrides={"fuse.*": "float"}))
    with pytest.raises(UserError, match="float"):
        convert(q, torch.rand(1, 3, 16, 16))


class SharedHead(torch.nn.Module):
    """Two pyramid levels through one head (conv-BN-ReLU then conv), as detection heads do."""

    def __init__(self) -> None:
        super().__init__()
        from hatcore.quant import DeQuantStub, QuantStub

        self.quant, self.dequant = QuantStub(1 / 128), DeQuantStub()
        self.c1 = torch.nn.Conv2d(3, 8, 3, 1, 1)
        self.c2 = torch.nn.Conv2d(8, 8, 3, 2, 1)
        self.tower = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, 1, 1), torch.nn.BatchNorm2d(8),
                                         torch.nn.ReLU())
        self.out = torch.nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        p3 = self.c1(self.quant(x))
        p4 = self.c2(p3)
        return [self.dequant(self.out(self.tower(p))) for p in (p3, p4)]


def test_shared_head_is_fused_once_and_converted_per_call() -> None:
    torch.manual_seed(0)
    net = SharedHead().eval()
    net.tower[1].running_var.uniform_(0.5, 2)
    x = yuv(2, 16)
    q = ready(net, x, QConfig())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) and n.startswith("tower.1")
                   for n, m in q.qgraph.named_modules())
    graph = convert(q, x[:1])
    names = [n.name for n in graph.nodes if n.op == "conv2d"]
    assert names.count("tower.0") == 1 and "tower.0@1" in names and "out@1" in names
    with torch.no_grad():
        ref = q(x)
    got = graph.unflatten_outputs(run_ir(graph, x.numpy()))
    assert isinstance(got, list) and len(got) == 2
    for r, g in zip(ref, got, strict=True):
        assert np.array_equal(g, r.numpy())


class WeightedFusion(torch.nn.Module):
    """BiFPN-style fast normalised fusion and a learnable output scale (constants × tensors)."""

    def __init__(self) -> None:
        super().__init__()
        from hatcore.quant import DeQuantStub, QuantStub

        self.quant, self.dequant = QuantStub(1 / 128), DeQuantStub()
        self.a, self.b = torch.nn.Conv2d(3, 4, 3, 1, 1), torch.nn.Conv2d(3, 4, 1)
        self.w = torch.nn.Parameter(torch.tensor([1.0, 0.4]))
        self.head = torch.nn.Conv2d(4, 2, 1)
        self.scale = torch.nn.Parameter(torch.tensor(-1.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant(x)
        w = F.relu(self.w)
        w = w / (w.sum() + 1e-4)
        y = w[0] * self.a(x) + w[1] * self.b(x)
        return self.dequant(self.head(y) * self.scale / 2.0)


def test_constant_multiplications_fold_into_multipliers() -> None:
    torch.manual_seed(0)
    x = yuv(2, 8)
    q = ready(WeightedFusion().eval(), x, QConfig())
    graph = convert(q, x[:1])
    assert [n.op for n in graph.nodes].count("requantize") == 4
    assert any(int(n.params["m"][0]) < 0 for n in graph.nodes if n.op == "requantize")
    with torch.no_grad():
        ref = q(x)
    got = run_ir(graph, x.numpy())[0]
    scale = graph.tensors[graph.producer(graph.outputs[0]).inputs[0]].scale
    assert scale > 0 and np.array_equal(got, ref.numpy())


class Unsupported(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from hatcore.quant import DeQuantStub, QuantStub

        self.quant, self.dequant = QuantStub(1 / 128), DeQuantStub()
        self.conv = torch.nn.Conv2d(3, 4, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(torch.sigmoid(self.conv(self.quant(x))))


def test_unsupported_op_is_named() -> None:
    q = ready(Unsupported().eval(), torch.rand(1, 3, 8, 8), QConfig())
    with pytest.raises(UserError, match="sigmoid"):
        convert(q, torch.rand(1, 3, 8, 8))


def test_quant_debug_command_is_registered() -> None:
    import click
    from hat_bpu.plugin import register_commands

    group = click.Group("hat")
    register_commands(cli=group)
    assert "quant-debug" in group.commands
    params = {p.name for p in group.commands["quant-debug"].params}
    assert {"recipe", "stage", "batches", "out"} <= params


@pytest.mark.parametrize("pow2", [False, True])
def test_fcos_shaped_model_converts_bit_exact(pow2: bool) -> None:
    from example_net import MiniFCOS

    torch.manual_seed(0)
    x = yuv(2, 64)
    q = ready(MiniFCOS().eval(), x, QConfig(pow2=pow2))
    graph = convert(q, x[:1])
    with torch.no_grad():
        ref = q(x)
    got = graph.unflatten_outputs(run_ir(graph, x.numpy()))
    assert len(got) == 3 and all(len(level) == 3 for level in got)
    for r_level, g_level in zip(ref, got, strict=True):
        for r, g in zip(r_level, g_level, strict=True):
            assert np.array_equal(g, r.numpy())
    outs = [graph.tensors[graph.producer(o).inputs[0]] for o in graph.outputs]
    assert {t.dtype for t in outs} == {"int16"}
    assert sum(n.op == "conv2d" and n.name.startswith("tower.0") for n in graph.nodes) == 3


class Flat(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from hatcore.quant import DeQuantStub, QuantStub

        self.quant, self.dequant = QuantStub(1 / 128), DeQuantStub()
        self.conv = torch.nn.Conv2d(3, 4, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(self.quant(x))
        return self.dequant(y.permute(0, 2, 3, 1).reshape(y.shape[0], -1, 4))


def test_layout_ops_keep_the_scale_and_convert() -> None:
    x = yuv(2, 8)
    q = ready(Flat().eval(), x, QConfig())
    graph = convert(q, x[:1])
    assert [n.op for n in graph.nodes][-3:] == ["permute", "reshape", "dequantize"]
    with torch.no_grad():
        ref = q(x)
    assert np.array_equal(run_ir(graph, x.numpy())[0], ref.numpy())


class PerLevelBN(torch.nn.Module):
    """One conv shared by two levels, each level with its own BN (as hat-fcos's head)."""

    def __init__(self) -> None:
        super().__init__()
        from hatcore.quant import DeQuantStub, QuantStub

        self.quant, self.dequant = QuantStub(1 / 128), DeQuantStub()
        self.stem = torch.nn.Conv2d(3, 4, 3, 1, 1)
        self.down = torch.nn.Conv2d(4, 4, 3, 2, 1)
        self.conv = torch.nn.Conv2d(4, 4, 3, 1, 1, bias=False)
        self.bns = torch.nn.ModuleList([torch.nn.BatchNorm2d(4), torch.nn.BatchNorm2d(4)])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        p3 = self.stem(self.quant(x))
        p4 = self.down(p3)
        return [self.dequant(F.relu(bn(self.conv(p))))
                for p, bn in zip((p3, p4), self.bns, strict=True)]


def test_shared_conv_with_per_level_bn_fuses_per_call() -> None:
    torch.manual_seed(0)
    net = PerLevelBN()
    net.bns[1].running_var.fill_(4.0)
    x = yuv(2, 8)
    q = ready(net, x, QConfig())
    a, b = q.qgraph.get_submodule("conv"), q.qgraph.get_submodule("conv@1")
    assert a.conv is b.conv and a.bn is not b.bn  # one weight, two BNs, two output scales
    graph = convert(q, x[:1])
    with torch.no_grad():
        ref = q(x)
    for r, g in zip(ref, graph.unflatten_outputs(run_ir(graph, x.numpy())), strict=True):
        assert np.array_equal(g, r.numpy())
