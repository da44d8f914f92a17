"""The trainer: schedules, EMA, parameter groups, checkpoints, resume, logging, hooks, DDP."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from hat_toy.plugin import ToyDataset, ToyDetector, ToyFlip
from torch import nn
from torch.utils.data import DataLoader

from hatcore import hookimpl
from hatcore.checkpoint import load_checkpoint
from hatcore.errors import UserError
from hatcore.optim import LRSchedule, ModelEMA, param_groups
from hatcore.plugins import make_plugin_manager
from hatcore.recipe import Optimizer, Schedule, TrainStage
from hatcore.trainer import (
    Trainer,
    build_optimizer,
    build_scheduler,
    calibrate,
    rng_state,
    set_rng_state,
)


def loader(length: int = 16, seed: int = 0) -> DataLoader:
    ds = ToyDataset(size=32, length=length, num_classes=2, seed=0, transforms=[ToyFlip(0.5)])
    return DataLoader(ds, batch_size=4, shuffle=True, collate_fn=ds.collate_fn, drop_last=True,
                      generator=torch.Generator().manual_seed(seed))


def stage(**kw) -> TrainStage:  # type: ignore[no-untyped-def]
    base = {"epochs": 3, "optimizer": Optimizer(lr=0.05, momentum=0.9, weight_decay=1e-4),
            "schedule": Schedule(type="cosine", warmup_iters=2), "log_interval": 2}
    return TrainStage(**{**base, **kw})


def make(tmp: Path, cfg: TrainStage, **kw) -> Trainer:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return Trainer(stage="float", model=ToyDetector(), cfg=cfg, train_loader=loader(),
                   out_dir=tmp, device=torch.device("cpu"), seed=0, **kw)


def test_cosine_schedule_with_warmup_values() -> None:
    s = LRSchedule(Schedule(type="cosine", warmup_iters=10, warmup_start_factor=0.1,
                            min_warmup_iters=0), 10, 5)
    assert s.factor(0) == pytest.approx(0.1)
    assert s.factor(5) == pytest.approx(0.1 + 0.9 * 0.5)
    assert s.factor(10) == pytest.approx(1.0)
    assert s.factor(30) == pytest.approx(0.5)  # halfway through the 40 cosine steps
    assert s.factor(49) == pytest.approx(0.5 * (1 + math.cos(math.pi * 39 / 40)))


def test_warmup_by_fractional_epochs_and_step_decay() -> None:
    s = LRSchedule(Schedule(type="step", warmup_epochs=0.5, milestones=[2, 4], gamma=0.1,
                            min_warmup_iters=0), 10, 6)
    assert s.warmup == 5
    assert s.factor(5) == 1.0 and s.factor(19) == 1.0
    assert s.factor(20) == pytest.approx(0.1) and s.factor(45) == pytest.approx(0.01)
    by_epoch = LRSchedule(Schedule(type="cosine", by="epoch"), 10, 4)
    assert by_epoch.factor(13) == by_epoch.factor(10) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_ema_follows_hats_decay_formula() -> None:
    model = nn.Linear(1, 1, bias=False)
    nn.init.constant_(model.weight, 0.0)
    ema = ModelEMA(model, decay=0.9999, tau=2000)
    nn.init.constant_(model.weight, 1.0)
    ema.update(model)
    d1 = 0.9999 * (1 - math.exp(-1 / 2000))
    assert float(ema.module.weight) == pytest.approx(1 - d1)
    ema.update(model)
    d2 = 0.9999 * (1 - math.exp(-2 / 2000))
    assert float(ema.module.weight) == pytest.approx(1 - d1 * d2, rel=1e-6)


def test_param_groups_put_norms_and_biases_apart() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    groups = {g["name"]: g for g in param_groups(model, Optimizer(weight_decay=4e-5))}
    assert [p.shape for p in groups["weight"]["params"]] == [(4, 3, 3, 3), (2, 4)]
    assert len(groups["norm"]["params"]) == 2 and len(groups["bias"]["params"]) == 2
    assert groups["weight"]["weight_decay"] == 4e-5
    assert groups["norm"]["weight_decay"] == 0.0 and groups["bias"]["weight_decay"] == 0.0


def test_training_writes_last_best_log_and_metrics(tmp_path) -> None:
    calls, weights = [], []

    def evaluate(model: nn.Module) -> dict[str, float]:
        calls.append(model)
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"AP": [0.2, 0.5, 0.4][len(calls) - 1]}

    trainer = make(tmp_path, stage(ema=True), evaluate=evaluate)
    trainer.fit()
    assert all(m is trainer.ema.module for m in calls)  # validated on the EMA weights
    best = load_checkpoint(tmp_path / "checkpoint-best.pt")
    assert best["epoch"] == 1 and json.loads(best["metrics"])["AP"] == 0.5
    last = load_checkpoint(tmp_path / "checkpoint-last.pt")
    assert last["epoch"] == 2 and last["step"] == 12 and last["ema"]["updates"] == 12
    assert {"model", "optimizer", "scheduler", "ema", "scaler", "rng", "stage", "best"} <= set(last)
    assert last["scheduler"] == {"step": 12} and last["best"] == 0.5 and last["stage"] == "float"
    assert set(last["rng"]) == {"torch", "cuda", "numpy", "random"}
    assert set(best) == {"format", "version", "model", "stage", "epoch", "metrics"}
    for k, v in weights[1].items():  # best holds the EMA weights validated at epoch 1
        assert torch.equal(best["model"][k], v), k
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    iters = [x for x in lines if x["kind"] == "iter"]
    assert [x["step"] for x in iters] == [2, 4, 6, 8, 10, 12]
    assert {"loss", "loss_box", "loss_cls", "lr", "img_s"} <= set(iters[0])
    assert [x["AP"] for x in lines if x["kind"] == "epoch"] == [0.2, 0.5, 0.4]
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["stage"] == "float" and summary["schema"] == 1
    assert summary["train"]["best"]["AP"] == 0.5 and summary["train"]["last"]["AP"] == 0.4


def test_resume_after_an_interruption_gives_the_same_weights(tmp_path, capsys) -> None:
    full = make(tmp_path / "full", stage(ema=True))
    full.fit()

    class Interrupt(Exception):
        pass

    def stop_after_first(trainer: Trainer, epoch: int) -> None:
        if epoch == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        make(tmp_path / "cut", stage(ema=True), before_epoch=stop_after_first).fit()
    assert load_checkpoint(tmp_path / "cut" / "checkpoint-last.pt")["epoch"] == 0
    capsys.readouterr()
    resumed = make(tmp_path / "cut", stage(ema=True))
    resumed.fit()
    assert "resuming float from epoch 2/3" in capsys.readouterr().out
    assert resumed.step == full.step == 12
    for (k, a), b in zip(full.raw_model.state_dict().items(),
                         resumed.raw_model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    for (k, a), b in zip(full.ema.module.state_dict().items(),
                         resumed.ema.module.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert resumed.optimizer.state_dict()["state"].keys() == full.optimizer.state_dict()["state"].keys()
    lines = [json.loads(x) for x in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines if x["kind"] == "epoch"] == [0, 1, 2]
    # a finished stage resumed again trains nothing more
    again = make(tmp_path / "cut", stage(ema=True))
    again.fit()
    assert again.step == 12
    assert "all 3 epochs already trained" in capsys.readouterr().out


def test_hook_on_epoch_end_sees_metrics_and_can_stop_training(tmp_path) -> None:
    seen = []

    class Stopper:
        @hookimpl
        def on_epoch_end(self, trainer, epoch, metrics):  # type: ignore[no-untyped-def]
            seen.append((epoch, round(metrics["lr"], 6) > 0, "loss" in metrics))
            trainer.should_stop = epoch == 1

    plugins = make_plugin_manager(entrypoints=False, extra=[("stopper", Stopper())])
    trainer = make(tmp_path, stage(epochs=5), hook=plugins.hook)
    trainer.fit()
    assert seen == [(0, True, True), (1, True, True)]
    last = load_checkpoint(tmp_path / "checkpoint-last.pt")
    assert last["epoch"] == 1 and last["stopped"]
    again = make(tmp_path, stage(epochs=5), hook=plugins.hook)
    again.fit()  # the stop is remembered: a second run trains nothing more
    assert again.step == trainer.step == 8 and len(seen) == 2


def test_gradient_clipping_and_bf16_autocast(tmp_path) -> None:
    trainer = make(tmp_path, stage(epochs=1, grad_clip=0.1, amp=True, channels_last=False))
    dtypes, norms = [], []
    conv = next(m for m in trainer.raw_model.modules() if isinstance(m, nn.Conv2d))
    conv.register_forward_hook(lambda m, args, out: dtypes.append(out.dtype))
    step = trainer.optimizer.step

    def recording_step(*args, **kw):  # type: ignore[no-untyped-def]
        grads = [p.grad for p in trainer.raw_model.parameters() if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        return step(*args, **kw)

    trainer.optimizer.step = recording_step  # type: ignore[method-assign]
    metrics = trainer.fit()
    assert math.isfinite(metrics["loss"])
    assert set(dtypes) == {torch.bfloat16} and len(norms) == 4
    assert max(norms) <= 0.1 + 1e-5


def test_calibrate_runs_exactly_the_asked_batches() -> None:
    count = []
    model = ToyDetector()
    model.register_forward_hook(lambda *a: count.append(1))
    assert calibrate(model, loader(length=8), batches=5, device=torch.device("cpu")) == 5
    assert len(count) == 5 and not model.training


def test_rng_state_survives_a_weights_only_checkpoint(tmp_path) -> None:
    from hatcore.checkpoint import save_checkpoint

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_checkpoint(tmp_path / "rng.pt", {"rng": rng_state()})
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_constant_schedule_warmup_by_iteration_and_build_scheduler() -> None:
    s = build_scheduler(Schedule(type="constant", warmup_iters=4, warmup_start_factor=0.2,
                                  min_warmup_iters=0), 3, 2)
    assert [round(s.factor(i), 6) for i in range(6)] == [0.2, 0.4, 0.6, 0.8, 1.0, 1.0]
    s = build_scheduler(Schedule(type="cosine", min_lr_ratio=0.1), 5, 2)
    assert s.factor(0) == 1.0 and s.factor(10) == pytest.approx(0.1)
    by_epoch = build_scheduler(Schedule(type="step", milestones=[1], by="epoch"), 4, 3)
    assert [by_epoch.factor(i) for i in (0, 3, 4, 11)] == [1.0, 1.0, pytest.approx(0.1),
                                                          pytest.approx(0.1)]


def test_optimizers_and_their_settings() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    sgd = build_optimizer(model, Optimizer(type="sgd", lr=0.1, momentum=0.8, nesterov=True,
                                           weight_decay=1e-4, norm_weight_decay=1e-5,
                                           bias_weight_decay=1e-3))
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.8
    assert {g["name"]: g["weight_decay"] for g in sgd.param_groups} == {
        "weight": 1e-4, "norm": 1e-5, "bias": 1e-3}
    adamw = build_optimizer(model, Optimizer(type="adamw", lr=1e-3, betas=[0.8, 0.99]))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["betas"] == (0.8, 0.99)
    assert all(g["weight_decay"] == 0.0 for g in adamw.param_groups)


def test_ema_copies_integer_buffers_and_averages_bn_statistics() -> None:
    model = nn.BatchNorm1d(2)
    ema = ModelEMA(model, decay=0.5, tau=1e-9)  # decay 0.5 from the first update
    model.train()
    model(torch.tensor([[1.0, 3.0], [3.0, 5.0]]))
    ema.update(model)
    assert int(ema.module.num_batches_tracked) == 1
    assert torch.allclose(ema.module.running_mean, model.running_mean * 0.5)


def test_without_evaluation_best_is_the_last_weights(tmp_path) -> None:
    trainer = make(tmp_path, stage(epochs=2, max_iters_per_epoch=2, val_interval=0))
    trainer.fit()
    best = load_checkpoint(tmp_path / "checkpoint-best.pt")
    assert best["stage"] == "float" and best["epoch"] == 1
    assert set(best) >= {"model", "metrics"} and "optimizer" not in best
    for k, v in trainer.raw_model.state_dict().items():
        assert torch.equal(best["model"][k], v), k
    assert trainer.step == 4  # max_iters_per_epoch caps the 4 batches of an epoch at 2
    summary = json.loads((tmp_path / "metrics.json").read_text())
    train = summary["train"]
    assert train["epochs"] == 2 and train["time"] > 0 and train["last"]["epoch"] == 1


def test_validation_every_n_epochs_and_at_the_end(tmp_path) -> None:
    seen: list[int] = []

    def evaluate(model: nn.Module) -> dict[str, float]:
        seen.append(1)
        return {"AP": 0.1 * len(seen)}

    trainer = make(tmp_path, stage(epochs=5, max_iters_per_epoch=1, val_interval=2),
                   evaluate=evaluate)
    trainer.fit()
    assert ["AP" in h for h in trainer.history] == [False, True, False, True, True]
    assert load_checkpoint(tmp_path / "checkpoint-best.pt")["epoch"] == 4


def test_channels_last_reaches_the_model_and_its_input(tmp_path) -> None:
    formats = []
    trainer = make(tmp_path, stage(epochs=1, max_iters_per_epoch=1, channels_last=True))
    trainer.raw_model.register_forward_pre_hook(
        lambda m, args: formats.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    trainer.fit()
    conv = next(m for m in trainer.raw_model.modules() if isinstance(m, nn.Conv2d))
    assert formats == [True] and conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_an_empty_training_set_is_a_user_error(tmp_path) -> None:
    with pytest.raises(UserError, match="float: the training set gives no batch"):
        Trainer(stage="float", model=ToyDetector(), cfg=stage(), train_loader=loader(length=2),
                out_dir=tmp_path, device=torch.device("cpu"))


def test_resume_is_exact_with_persistent_loader_workers(tmp_path) -> None:
    def run(out: Path, before_epoch=None) -> Trainer:  # type: ignore[no-untyped-def]
        ds = ToyDataset(size=32, length=8, num_classes=2, seed=0, transforms=[ToyFlip(0.5)])
        workers = DataLoader(ds, batch_size=4, shuffle=True, collate_fn=ds.collate_fn,
                             num_workers=1, persistent_workers=True,
                             generator=torch.Generator().manual_seed(0))
        torch.manual_seed(0)
        trainer = Trainer(stage="float", model=ToyDetector(), cfg=stage(epochs=2),
                          train_loader=workers, out_dir=out, device=torch.device("cpu"),
                          before_epoch=before_epoch)
        trainer.fit()
        return trainer

    def interrupt(trainer: Trainer, epoch: int) -> None:
        if epoch == 1:
            raise KeyboardInterrupt

    full = run(tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", interrupt)
    resumed = run(tmp_path / "cut")
    for (k, a), b in zip(full.raw_model.state_dict().items(),
                         resumed.raw_model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_frozen_bn_keeps_running_statistics_of_the_matching_modules(tmp_path) -> None:
    trainer = make(tmp_path, stage(epochs=1, frozen_bn=["body.1"]))
    frozen = trainer.raw_model.body[1]
    before = frozen.running_mean.clone()
    other = trainer.raw_model.body[4].running_mean.clone()
    trainer.fit()
    assert torch.equal(frozen.running_mean, before)
    assert not torch.equal(trainer.raw_model.body[4].running_mean, other)
    assert frozen.weight.grad is not None  # the affine parameters still train


def test_frozen_modules_keep_their_weights_and_stay_out_of_the_optimizer(tmp_path) -> None:
    trainer = make(tmp_path, stage(epochs=1, frozen=["body.[01]"]))
    model = trainer.raw_model
    first = {k: v.clone() for k, v in model.body[:2].state_dict().items()}
    rest = model.body[3].weight.clone()
    trainer.fit()
    after = model.body[:2].state_dict()
    for key in ("0.weight", "0.bias", "1.weight", "1.bias"):
        assert torch.equal(after[key], first[key]), key  # no step moved them
        assert model.body[:2].get_parameter(key).grad is None
    assert not torch.equal(after["1.running_mean"], first["1.running_mean"])  # stats still follow
    assert not torch.equal(model.body[3].weight, rest)  # the rest trains
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert in_optimizer.isdisjoint(id(p) for p in model.body[:2].parameters())
    assert id(model.body[3].weight) in in_optimizer


def test_a_frozen_pattern_matching_no_module_is_a_user_error(tmp_path) -> None:
    with pytest.raises(UserError, match=r"stages.float.frozen: 'backbone\*' matches no module.*body"):
        make(tmp_path, stage(epochs=1, frozen=["backbone*"]))


class _SlowToy(ToyDataset):
    """The toy set, each item ``delay`` seconds slower to make (a slow decoder)."""

    def __init__(self, delay: float, **kw) -> None:  # type: ignore[no-untyped-def]
        super().__init__(**kw)
        self.delay = delay

    def __getitem__(self, i: int):  # type: ignore[no-untyped-def]
        import time

        time.sleep(self.delay)
        return super().__getitem__(i)


@pytest.mark.parametrize("workers", [0, 1])
def test_the_loader_figures_and_the_warning_when_steps_wait_for_data(tmp_path, capsys,
                                                                     workers) -> None:
    from hatcore.data import LOAD_SECONDS, TimedDataset

    seen: list[set] = []

    class Watching(ToyDetector):
        def compute_loss(self, raw, batch):  # type: ignore[no-untyped-def]
            seen.append(set(batch))
            return super().compute_loss(raw, batch)

    delay = 0.05  # per image: each batch of 4 takes at least 0.2 s to make
    raw = _SlowToy(delay, size=32, length=24, num_classes=2, seed=0, transforms=[])
    ds = TimedDataset(raw, raw.collate_fn)
    assert ds.num_classes == raw.num_classes and len(ds) == 24  # the wrapped set's attributes
    slow = DataLoader(ds, batch_size=4, shuffle=True, collate_fn=ds.collate_fn, drop_last=True,
                      num_workers=workers, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    trainer = Trainer(stage="float", model=Watching(), cfg=stage(epochs=1), train_loader=slow,
                      out_dir=tmp_path, device=torch.device("cpu"), seed=0)
    trainer.fit()
    (m,) = trainer.history
    assert seen and all(LOAD_SECONDS not in keys for keys in seen)  # popped before the model
    # 6 batches; the first's wait (the worker's start) is apart: 5 waits of >= 0.2 s each
    assert m["loader_img_s"] <= 4 / (4 * delay) * 1.001  # at most 1 / delay per image
    assert m["loader_img_s"] > 0 and m["train_img_s"] > m["loader_img_s"]  # the toy steps: fast
    assert m["loader_ratio"] == pytest.approx(m["loader_img_s"] / m["train_img_s"], rel=1e-2)
    assert m["data_wait"] > 0.5 and m["first_batch_s"] >= 4 * delay
    out = capsys.readouterr().out
    assert "float: epoch 1 waited for data" in out and "data.train.num_workers" in out
    assert f"with {workers} worker" in out
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [x["kind"] for x in lines].count("warning") == 1


def test_no_loader_warning_when_the_data_keeps_up(tmp_path, capsys) -> None:
    from hatcore.data import TimedDataset

    raw = ToyDataset(size=32, length=16, num_classes=2, seed=0, transforms=[])
    ds = TimedDataset(raw, raw.collate_fn)
    trainer = Trainer(stage="float", model=ToyDetector(), cfg=stage(epochs=1),
                      train_loader=DataLoader(ds, batch_size=4, collate_fn=ds.collate_fn),
                      out_dir=tmp_path, device=torch.device("cpu"), seed=0)
    trainer.fit()
    m = trainer.history[-1]
    assert "loader_img_s" in m and "waited for data" not in capsys.readouterr().out
    # an untimed loader (a dataset without the wrapper): the wait only
    trainer = make(tmp_path / "plain", stage(epochs=1))
    trainer.fit()
    assert "data_wait" in trainer.history[-1] and "loader_img_s" not in trainer.history[-1]
    # the rule: over 10 % of the epoch and over half a second
    from hatcore.trainer import feed_warning
    assert feed_warning("float", 0, {"data_wait": 0.5, "data_wait_s": 0.2}, 0) is None
    assert feed_warning("float", 0, {"data_wait": 0.05, "data_wait_s": 9.0}, 0) is None
    assert "waited for data 50%" in str(feed_warning("float", 0, {"data_wait": 0.5,
                                                                  "data_wait_s": 2.0}, 0))
