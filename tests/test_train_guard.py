"""Batch-aware lr, the warmup floor, the divergence guard and load_from (issue 10).

Expected values are worked out by hand in the comments.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from hat_toy.plugin import ToyDataset, ToyDetector, ToyFlip
from torch.utils.data import DataLoader

from hatcore.checkpoint import load_checkpoint, save_checkpoint
from hatcore.errors import UserError
from hatcore.optim import LRSchedule, scaled_lr, warmup_iters
from hatcore.recipe import Optimizer, Schedule, TrainStage
from hatcore.trainer import DivergenceError, Trainer, loss_rise_warning


def _loader() -> DataLoader:
    ds = ToyDataset(size=32, length=16, num_classes=2, seed=0, transforms=[ToyFlip(0.5)])
    return DataLoader(ds, batch_size=4, shuffle=True, collate_fn=ds.collate_fn, drop_last=True,
                      generator=torch.Generator().manual_seed(0))


def _trainer(tmp: Path, model: torch.nn.Module, **kw: Any) -> Trainer:
    cfg = TrainStage(**{"epochs": 3, "optimizer": Optimizer(lr=0.05, momentum=0.9),
                        "schedule": Schedule(type="constant"), "log_interval": 1, **kw})
    return Trainer(stage="float", model=model, cfg=cfg, train_loader=_loader(), out_dir=tmp,
                   device=torch.device("cpu"), seed=0)


def _log(tmp: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (tmp / "log.jsonl").read_text().splitlines()]


def test_lr_scaling_rules() -> None:
    # the seed: lr 0.14 for 8 GPUs x 28 = 224 images; one process with batch 8
    seed = dict(lr=0.14, base_batch_size=224)
    assert scaled_lr(Optimizer(**seed), 8)[0] == pytest.approx(0.14 * 8 / 224)  # 0.005
    assert scaled_lr(Optimizer(**seed, lr_scaling="sqrt"), 8)[0] == pytest.approx(
        0.14 * math.sqrt(1 / 28))  # 0.02646
    assert scaled_lr(Optimizer(**seed, lr_scaling="none"), 8)[0] == 0.14
    assert scaled_lr(Optimizer(**seed), 448)[0] == pytest.approx(0.28)
    lr, why = scaled_lr(Optimizer(lr=0.14), 8)  # no base_batch_size: today's behaviour
    assert lr == 0.14 and "no base_batch_size" in why
    assert "8/224" in scaled_lr(Optimizer(**seed), 8)[1]
    with pytest.raises(UserError, match="base_batch_size = 0"):
        scaled_lr(Optimizer(lr=0.1, base_batch_size=0), 8)


def test_warmup_floor() -> None:
    # 2 epochs of 4 iterations = 8 asked -> the floor, 100 (a stage of 1000 iterations)
    assert warmup_iters(Schedule(warmup_epochs=2.0), 4, 1000) == 100
    assert warmup_iters(Schedule(warmup_epochs=2.0), 4, 60) == 60  # never beyond the stage
    assert warmup_iters(Schedule(warmup_epochs=2.0, min_warmup_iters=0), 4, 1000) == 8
    assert warmup_iters(Schedule(warmup_iters=300), 4, 1000) == 300  # longer than the floor
    assert warmup_iters(Schedule(), 4, 1000) == 0  # no warmup asked: none added
    s = LRSchedule(Schedule(type="constant", warmup_epochs=1.0, warmup_start_factor=0.1), 4, 50)
    assert s.warmup == 100 and s.factor(50) == pytest.approx(0.1 + 0.9 * 50 / 100)


def test_trainer_trains_with_the_scaled_lr_and_logs_why(tmp_path: Path) -> None:
    t = _trainer(tmp_path, ToyDetector(), epochs=1,
                 optimizer=Optimizer(lr=0.08, base_batch_size=16, momentum=0.9))
    t.fit()
    log = _log(tmp_path)
    lr_rec = next(r for r in log if r["kind"] == "lr")
    assert lr_rec["lr"] == pytest.approx(0.02) and lr_rec["global_batch"] == 4  # 0.08 x 4/16
    assert "x 4/16" in lr_rec["why"]
    assert all(r["lr"] == pytest.approx(0.02) for r in log if r["kind"] == "iter")


class NanAfter(ToyDetector):
    """A detector whose loss turns NaN from its ``n``-th training step."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.calls = n, 0

    def compute_loss(self, raw: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        losses = super().compute_loss(raw, batch)
        self.calls += 1
        if self.calls > self.n:
            losses["loss_box"] = losses["loss_box"] * float("nan")
        return losses


def test_divergence_guard_stops_with_the_step_and_keeps_the_last_good_checkpoint(
        tmp_path: Path) -> None:
    t = _trainer(tmp_path, NanAfter(8))  # 4 steps per epoch: steps 0-7 fine, step 8 NaN
    with pytest.raises(DivergenceError, match="not finite at step 8 \\(epoch 3\\)") as err:
        t.fit()
    assert "loss_box = nan" in str(err.value) and "lr too high" in str(err.value)
    assert isinstance(err.value, UserError)  # exit 2, one paragraph, no traceback
    state = load_checkpoint(tmp_path / "checkpoint-last.pt")
    assert state["epoch"] == 1 and state["step"] == 8  # the end of epoch 2: the last good one
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    # the weights in memory never took the bad step either: they equal the checkpoint's
    for k, v in t.raw_model.named_parameters():
        torch.testing.assert_close(v.detach(), state["model"][k])


class Rising(ToyDetector):
    """A detector whose loss is multiplied by 10 after its first epoch (4 steps)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def compute_loss(self, raw: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        self.calls += 1
        gain = 1.0 if self.calls <= 4 else 10.0
        return {k: v * gain for k, v in super().compute_loss(raw, batch).items()}


def test_a_rising_epoch_loss_warns_in_the_log_and_on_the_terminal(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _trainer(tmp_path, Rising(), epochs=2, optimizer=Optimizer(lr=0.0)).fit()
    out = capsys.readouterr().out + capsys.readouterr().err
    assert "training is likely diverging" in out and "lr too high for this batch" in out
    warns = [r for r in _log(tmp_path) if r["kind"] == "warning" and "diverging" in r["message"]]
    assert len(warns) == 1 and warns[0]["epoch"] == 1
    # the rule itself: 2.0x the first epoch's mean loss
    hist = [{"loss": 1.0}, {"loss": 1.9}]
    assert loss_rise_warning("float", hist, 2.0, "lr 0.1") is None
    assert "2.1x" in str(loss_rise_warning("float", [{"loss": 1.0}, {"loss": 2.1}], 2.0, "x"))
    assert loss_rise_warning("float", [{"loss": 1.0}, {"loss": 9.0}], 0.0, "x") is None  # off


def test_load_from_with_another_num_classes_names_the_keys(tmp_path: Path) -> None:
    donor = ToyDetector(num_classes=5)
    path = tmp_path / "coco.pt"
    save_checkpoint(path, {"model": donor.state_dict(), "stage": "float"})
    with pytest.raises(UserError) as err:
        _trainer(tmp_path / "strict", ToyDetector(num_classes=2), epochs=1,
                 load_from=str(path)).fit()
    msg = str(err.value)
    assert "cls.weight: checkpoint (5, 8, 1, 1), model (2, 8, 1, 1)" in msg
    assert "cls.bias: checkpoint (5,), model (2,)" in msg and "load_strict = false" in msg
    assert "box.weight" not in msg  # matching keys are not reported
    t = _trainer(tmp_path / "loose", ToyDetector(num_classes=2), epochs=1, load_from=str(path),
                 load_strict=False, optimizer=Optimizer(lr=0.0))
    t.out_dir.mkdir(parents=True)
    before = {k: v.clone() for k, v in t.raw_model.state_dict().items()}
    t._load_from()
    got = t.raw_model.state_dict()
    torch.testing.assert_close(got["box.weight"], donor.state_dict()["box.weight"])
    torch.testing.assert_close(got["cls.weight"], before["cls.weight"])  # skipped: kept
    rec = next(r for r in _log(tmp_path / "loose") if r["kind"] == "load_from")
    assert [s.split(":")[0] for s in rec["skipped"]] == ["cls.weight", "cls.bias"]


def test_load_from_a_missing_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="stages.float.load_from: .*nope.pt: no such checkpoint"):
        _trainer(tmp_path, ToyDetector(), epochs=1, load_from=str(tmp_path / "nope.pt")).fit()
