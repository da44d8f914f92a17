"""The quantize hook: task methods kept, state_dict round trip, overrides, QAT, freezes, debug."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from example_net import SmallNet
from hat_bpu.plugin import HorizonQuantizeSpec, apply_freezes, on_epoch_end
from hat_bpu.plugin import quantize as quantize_hook
from hat_bpu.quant.debug import compare_layers, format_table, write_report
from hat_bpu.quant.fake_quant import ActFQ, QConv2d
from torch.nn import functional as F

from hatcore import quant


def quantize(**kw: Any) -> Any:
    """The hook with the default [target] (bayes-e)."""
    return quantize_hook(target=None, **kw)


def spec(**kw: object) -> HorizonQuantizeSpec:
    return HorizonQuantizeSpec(type="horizon", **kw)  # type: ignore[arg-type]


def data(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 16, 16), generator=g).float().sub(128).div(128)


def calibrate(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    quant.set_mode(model, "observe")
    with torch.no_grad():
        for b in x.split(4):
            model(b)
    quant.set_mode(model, "fake_quant")
    return model


def test_prepared_model_keeps_task_methods_and_round_trips() -> None:
    torch.manual_seed(0)
    float_model = SmallNet().eval()
    assert quantize(model=float_model, spec=object(), stage="calibration") is None
    q = calibrate(quantize(model=float_model, spec=spec(), stage="calibration"), data(8, 0))
    x = data(2, 1)
    out = q(x)
    assert set(q.compute_loss(out, out)) == {"loss"}  # the task model's own method
    state = q.state_dict()
    fresh = quantize(model=SmallNet().eval(), spec=spec(), stage="qat")
    fresh.load_state_dict(state)
    quant.set_mode(fresh, "fake_quant")
    for a, b in zip(fresh.eval()(x), out, strict=True):
        assert torch.equal(a, b)
    with torch.no_grad():
        ref = float_model(x)
    assert all(0 < (a - b).abs().max() < 0.2 for a, b in zip(out, ref, strict=True))


def test_overrides_by_name_type_and_hint() -> None:
    q = quantize(model=SmallNet().eval(), spec=spec(overrides={"cls": "int16"}), stage="qat")
    assert q.qgraph.get_submodule("cls").out_fq.dtype == "int16"
    assert q.qgraph.get_submodule("box").out_fq.dtype == "int16"  # the model's hint
    assert q.qgraph.get_submodule("stem.0").out_fq.dtype == "int8"
    q = quantize(model=SmallNet().eval(), spec=spec(overrides={"_hat_q.cat*": "int16"}),
                 stage="qat")
    assert q.qgraph.get_submodule("_hat_q.cat").out_fq.dtype == "int16"  # functional ops too
    q = quantize(model=SmallNet().eval(), spec=spec(type_overrides={"Conv2d": "int16"}),
                 stage="qat")
    assert q.qgraph.get_submodule("stem.0").out_fq.dtype == "int16"
    q = calibrate(quantize(model=SmallNet().eval(), spec=spec(overrides={"cls": "float"}),
                           stage="calibration"), data(4, 0))
    assert type(q.qgraph.get_submodule("cls")) is torch.nn.Conv2d  # left alone
    cls, box = q(data(1, 1))
    assert len(torch.unique(cls)) > 100  # not on an integer grid


def test_qat_improves_on_calibration() -> None:
    torch.manual_seed(0)
    teacher = SmallNet(width=8).eval()
    for m in teacher.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.05, 0.2)
    train, val = data(32, 0), data(16, 1)
    with torch.no_grad():
        t_train, t_val = teacher(train), teacher(val)
    # a clipping calibration (99th percentile); QAT adapts weights and ranges, BN folded
    s = spec(observer="percentile", percentile=99.0, freeze_bn_epoch=0, qat_averaging=0.01)
    q = calibrate(quantize(model=copy.deepcopy(teacher), spec=s, stage="calibration"), train)

    def val_loss(m: torch.nn.Module) -> float:
        with torch.no_grad():
            return float(m.compute_loss(m.eval()(val), t_val)["loss"])

    before = val_loss(q)
    state = q.state_dict()  # as the pipeline does: a fresh qat model loads the calibration
    q = quantize(model=copy.deepcopy(teacher), spec=s, stage="qat")
    q.load_state_dict(state)
    quant.set_mode(q, "qat")
    opt = torch.optim.SGD(q.parameters(), lr=3e-3, momentum=0.9)
    for step in range(60):
        i = (step % 8) * 4
        q.train()
        loss = q.compute_loss(q(train[i:i + 4]), tuple(t[i:i + 4] for t in t_train))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    quant.set_mode(q, "fake_quant")
    after = val_loss(q)
    assert after < 0.6 * before, (before, after)


def test_freeze_bn_and_observers() -> None:
    q = calibrate(quantize(model=SmallNet().eval(), spec=spec(freeze_bn_epoch=1,
                           freeze_observer_epoch=2), stage="qat"), data(4, 0))
    quant.set_mode(q, "qat")
    conv = q.qgraph.get_submodule("stem.0")
    assert apply_freezes(q, 0) == [] and not conv.bn_frozen
    assert apply_freezes(q, 1) == ["bn"]
    q.train()
    assert conv.bn_frozen and not conv.bn.training
    mean = conv.bn.running_mean.clone()
    scale = float(conv.out_fq.scale)
    q(data(4, 2) * 0.5)
    assert torch.equal(mean, conv.bn.running_mean)
    assert float(conv.out_fq.scale) != scale  # observers still follow the data
    assert apply_freezes(q, 2) == ["bn", "observer"]
    scale = float(conv.out_fq.scale)
    q(data(4, 3) * 0.2)
    assert float(conv.out_fq.scale) == scale
    resumed = quantize(model=SmallNet().eval(), spec=spec(freeze_bn_epoch=1,
                       freeze_observer_epoch=2), stage="qat")
    resumed.load_state_dict(q.state_dict())  # a QAT run resumed from its checkpoint
    conv2 = resumed.qgraph.get_submodule("stem.0")
    assert conv2.bn_frozen and conv2.out_fq.observer_frozen
    fresh = quantize(model=SmallNet().eval(), spec=spec(freeze_bn_epoch=0), stage="qat")
    fresh.load_state_dict(calibrate(quantize(model=SmallNet().eval(), spec=spec(freeze_bn_epoch=0),
                                             stage="calibration"), data(4, 0)).state_dict())
    assert fresh.qgraph.get_submodule("stem.0").bn_frozen  # frozen from the start, as asked


def test_lsq_learns_scales() -> None:
    q = calibrate(quantize(model=SmallNet().eval(), spec=spec(lsq=True), stage="qat"),
                  data(4, 0))
    quant.set_mode(q, "qat")
    cls, box = q.train()(data(2, 1))
    (cls.square().mean() + box.square().mean()).backward()
    fq = q.qgraph.get_submodule("stem.0").out_fq
    assert isinstance(fq.scale, torch.nn.Parameter) and fq.scale.grad is not None
    assert float(fq.scale.grad) != 0.0


def test_quant_debug_report(tmp_path: Path) -> None:
    q = calibrate(quantize(model=SmallNet().eval(), spec=spec(), stage="calibration"), data(8, 0))
    q.qgraph.get_submodule("fuse.0").out_fq.scale.fill_(1.0)  # a range far too large for int8
    rows = compare_layers(q, [data(2, 1)], integer=True)
    assert [r["sqnr_db"] for r in rows] == sorted(r["sqnr_db"] for r in rows)
    worst = rows[0]
    assert worst["layer"] in ("fuse.0", "cls", "box") and rows[-1]["cosine"] > 0.99
    fuse = next(r for r in rows if r["layer"] == "fuse.0")
    assert any(f.startswith("range") for f in fuse["flags"])
    assert all(r["int_max_err_lsb"] <= 1.001 and r["int_identical"] > 0.99
               for r in rows if r["type"] != "ActFQ")
    assert "int=fq" in format_table(rows)
    paths = write_report(rows, tmp_path)
    assert json.loads(paths["json"].read_text())["layers"][0]["layer"] == worst["layer"]
    assert paths["png"].stat().st_size > 1000 and "fuse.0" in format_table(rows)
    assert isinstance(q.qgraph.get_submodule("stem.0"), QConv2d)
    assert isinstance(q.qgraph.get_submodule("quant"), ActFQ)
    assert F is not None


def test_quantize_hook_through_the_plugin_manager_on_the_toy_detector() -> None:
    pytest.importorskip("hat_toy")
    from hat_toy.plugin import ToyDataset, ToyDetector

    from hatcore.plugins import get_plugins
    from hatcore.recipe import QuantizeSpec, make_converter

    plugins = get_plugins()
    qs = make_converter(plugins.registry).structure({"observer": "percentile"}, QuantizeSpec)
    assert isinstance(qs, HorizonQuantizeSpec)  # horizon is the default quantizer type
    model = plugins.hook.quantize(model=ToyDetector().eval(), spec=qs, stage="calibration",
                                  target=None)
    ds = ToyDataset(32, 4, 2, 0, [])
    batch = ds.collate_fn([ds[i] for i in range(4)])
    calibrate(model, batch["img"])
    raw = model(batch["img"])
    dets = model.postprocess(raw, batch)
    assert len(dets) == 4 and set(dets[0]) == {"boxes", "scores", "labels"}
    assert float(sum(model.compute_loss(raw, batch).values()).detach()) > 0
    trainer = type("T", (), {"stage": "qat", "model": model})()
    model.freeze_bn_epoch = 1
    assert any(getattr(impl.plugin, "__name__", "") == "hat_bpu.plugin"
               for impl in plugins.hook.on_epoch_end.get_hookimpls())
    on_epoch_end(trainer=trainer, epoch=0, metrics={})  # ours alone: the core's logs need more
    assert all(m.bn_frozen for m in model.modules() if isinstance(m, QConv2d))
