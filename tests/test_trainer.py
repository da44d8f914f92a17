"""The trainer: schedules, EMA, parameter groups, checkpoints, resume, logging, hooks, DDP."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hat_toy.plugin import ToyDataset, ToyDetector, ToyFlip
from torch import nn
from torch.utils.data import DataLoader

from hatcore import hookimpl
from hatcore.checkpoint import load_checkpoint
from hatcore.optim import LRSchedule, ModelEMA, param_groups
from hatcore.plugins import make_plugin_manager
from hatcore.recipe import Optimizer, Schedule, TrainStage
from hatcore.trainer import Trainer, calibrate


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
    s = LRSchedule(Schedule(type="cosine", warmup_iters=10, warmup_start_factor=0.1), 10, 5)
    assert s.factor(0) == pytest.approx(0.1)
    assert s.factor(5) == pytest.approx(0.1 + 0.9 * 0.5)
    assert s.factor(10) == pytest.approx(1.0)
    assert s.factor(30) == pytest.approx(0.5)  # halfway through the 40 cosine steps
    assert s.factor(49) == pytest.approx(0.5 * (1 + math.cos(math.pi * 39 / 40)))


def test_warmup_by_fractional_epochs_and_step_decay() -> None:
    s = LRSchedule(Schedule(type="step", warmup_epochs=0.5, milestones=[2, 4], gamma=0.1), 10, 6)
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
    calls = []

    def evaluate(model: nn.Module) -> dict[str, float]:
        calls.append(model)
        return {"AP": [0.2, 0.5, 0.4][len(calls) - 1]}

    trainer = make(tmp_path, stage(ema=True), evaluate=evaluate)
    trainer.fit()
    assert all(m is trainer.ema.module for m in calls)  # validated on the EMA weights
    best = load_checkpoint(tmp_path / "checkpoint-best.pt")
    assert best["epoch"] == 1 and json.loads(best["metrics"])["AP"] == 0.5
    last = load_checkpoint(tmp_path / "checkpoint-last.pt")
    assert last["epoch"] == 2 and last["step"] == 12 and last["ema"]["updates"] == 12
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    iters = [x for x in lines if x["kind"] == "iter"]
    assert [x["step"] for x in iters] == [2, 4, 6, 8, 10, 12]
    assert {"loss", "loss_box", "loss_cls", "lr", "img_s"} <= set(iters[0])
    assert [x["AP"] for x in lines if x["kind"] == "epoch"] == [0.2, 0.5, 0.4]
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["best"]["AP"] == 0.5 and summary["last"]["AP"] == 0.4


def test_resume_after_an_interruption_gives_the_same_weights(tmp_path) -> None:
    full = make(tmp_path / "full", stage())
    full.fit()

    class Interrupt(Exception):
        pass

    def stop_after_first(trainer: Trainer, epoch: int) -> None:
        if epoch == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        make(tmp_path / "cut", stage(), before_epoch=stop_after_first).fit()
    resumed = make(tmp_path / "cut", stage())
    resumed.fit()
    assert resumed.step == full.step == 12
    for (k, a), b in zip(full.raw_model.state_dict().items(),
                         resumed.raw_model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


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
    assert load_checkpoint(tmp_path / "checkpoint-last.pt")["epoch"] == 1


def test_gradient_clipping_and_bf16_autocast_run(tmp_path) -> None:
    trainer = make(tmp_path, stage(epochs=1, grad_clip=0.1, amp=True, channels_last=False))
    metrics = trainer.fit()
    assert math.isfinite(metrics["loss"])


def test_calibrate_runs_exactly_the_asked_batches() -> None:
    count = []
    model = ToyDetector()
    model.register_forward_hook(lambda *a: count.append(1))
    assert calibrate(model, loader(length=8), batches=5, device=torch.device("cpu")) == 5
    assert len(count) == 5 and not model.training


def test_two_processes_train_to_identical_weights(tmp_path) -> None:
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), str(tmp_path)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "out" / "checkpoint-last.pt").is_file()


DDP_SCRIPT = """
import sys
from pathlib import Path
import torch
from torch.utils.data import DataLoader, DistributedSampler
from hat_toy.plugin import ToyDataset, ToyDetector
from hatcore import distributed as dist
from hatcore.recipe import TrainStage, Optimizer
from hatcore.trainer import Trainer

out = Path(sys.argv[1])
dist.init()
assert dist.world_size() == 2
torch.manual_seed(0)
ds = ToyDataset(32, 16, 2, 0, [])
loader = DataLoader(ds, batch_size=2, sampler=DistributedSampler(ds, seed=0), collate_fn=ds.collate_fn)
cfg = TrainStage(epochs=2, optimizer=Optimizer(lr=0.05), sync_bn=True)
trainer = Trainer(stage="float", model=ToyDetector(), cfg=cfg, train_loader=loader,
                  out_dir=out / "out", device=torch.device("cpu"))
trainer.fit()
# parameters only: BN running stats follow each rank's last batch (DDP broadcasts rank 0's
# buffers at the start of every forward), parameters must be identical
params = {k: v.detach() for k, v in trainer.raw_model.named_parameters()}
torch.save(params, out / f"rank{dist.rank()}.pt")
"""
