"""Resume is exact: QAT after the hooks' freezes, mid-epoch checkpoints, deterministic mode.

Each test trains an uninterrupted run and an interrupted-then-resumed one with the same code and
compares every tensor of the results; nothing is compared with itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from hat_toy.plugin import ToyDataset, ToyDetector, ToyFlip
from torch import nn
from torch.utils.data import DataLoader

from hatcore import quant
from hatcore.checkpoint import load_checkpoint
from hatcore.errors import UserError
from hatcore.plugins import make_plugin_manager
from hatcore.recipe import Optimizer, QuantizeSpec, Schedule, TrainStage, make_converter
from hatcore.trainer import Trainer, configure_determinism


class Interrupt(BaseException):
    """Stands for Ctrl-C or a crash in the middle of training."""


def toy_loader(num_workers: int = 0, length: int = 16) -> DataLoader:
    ds = ToyDataset(size=32, length=length, num_classes=2, seed=0, transforms=[ToyFlip(0.5)])
    return DataLoader(ds, batch_size=4, shuffle=True, collate_fn=ds.collate_fn, drop_last=True,
                      num_workers=num_workers, generator=torch.Generator().manual_seed(0))


def assert_same_tensors(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_same_optimizer(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    assert sa.keys() == sb.keys() and sa
    for k in sa:
        for name, value in sa[k].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(sb[k][name])), (k, name)


# --------------------------------------------------------------------------- QAT resume


def _qat_model(plugins: Any, qspec: QuantizeSpec) -> nn.Module:
    torch.manual_seed(0)
    model = plugins.hook.quantize(model=ToyDetector().eval(), spec=qspec, stage="qat",
                                  target=None)
    quant.set_mode(model, "observe")
    with torch.no_grad():
        for batch in toy_loader():
            model(batch["img"])
    quant.set_mode(model, "qat")
    return model


def test_qat_resumed_after_the_freeze_epoch_equals_an_uninterrupted_run(tmp_path) -> None:
    """hat-bpu freezes BN statistics and observers in ``on_epoch_end``; checkpoint-last must be
    written after that hook, or a run resumed at the freeze epoch trains with live BN."""
    pytest.importorskip("hat_bpu")
    plugins = make_plugin_manager(only={"hat-bpu"})
    qspec = make_converter(plugins.registry).structure(
        {"type": "horizon", "observer": "minmax", "freeze_bn_epoch": 1,
         "freeze_observer_epoch": 1}, QuantizeSpec)
    cfg = TrainStage(epochs=2, optimizer=Optimizer(lr=0.02), schedule=Schedule(type="constant"),
                     channels_last=False)

    def run(out: Path, before_epoch: Any = None) -> Trainer:
        trainer = Trainer(stage="qat", model=_qat_model(plugins, qspec), cfg=cfg,
                          train_loader=toy_loader(length=8), out_dir=out, device=torch.device("cpu"),
                          hook=plugins.hook, before_epoch=before_epoch)
        trainer.fit()
        return trainer

    def stop_at_epoch_1(trainer: Trainer, epoch: int) -> None:
        if epoch == 1:
            raise Interrupt

    full = run(tmp_path / "full")
    with pytest.raises(Interrupt):
        run(tmp_path / "cut", stop_at_epoch_1)
    saved = load_checkpoint(tmp_path / "cut" / "checkpoint-last.pt")
    assert saved["epoch"] == 0
    flags = [v for k, v in saved["model"].items() if k.endswith("bn_frozen_flag")]
    assert flags and all(bool(f) for f in flags)  # the checkpoint holds the freeze of epoch 0's end
    resumed = run(tmp_path / "cut")
    assert resumed.step == full.step == 4
    assert_same_tensors(full.raw_model.state_dict(), resumed.raw_model.state_dict())
    assert_same_optimizer(full.optimizer, resumed.optimizer)


# --------------------------------------------------------------------------- mid-epoch checkpoints


class DropoutToy(ToyDetector):
    """A toy model whose training step draws random numbers (dropout), so resume must restore
    the RNG state exactly, not just re-seed the epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.3)

    def forward(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.drop(self.body(self.quant(img)))
        return self.dequant(self.box(x)), self.dequant(self.cls(x))


class InterruptingTrainer(Trainer):
    """Raises before the training step numbered ``stop_at`` (global, from 0)."""

    stop_at: int | None = None

    def _train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        if self.step == self.stop_at:
            raise Interrupt
        return super()._train_step(batch)


def _mid_epoch_run(out: Path, num_workers: int, stop_at: int | None = None) -> Trainer:
    torch.manual_seed(0)
    cfg = TrainStage(epochs=2, optimizer=Optimizer(lr=0.05, momentum=0.9, weight_decay=1e-4),
                     schedule=Schedule(type="cosine", warmup_iters=2), ema=True, ema_tau=3.0,
                     checkpoint_every_iters=2, log_interval=1, val_interval=0)
    trainer = InterruptingTrainer(stage="float", model=DropoutToy(), cfg=cfg,
                                  train_loader=toy_loader(num_workers, length=16), out_dir=out,
                                  device=torch.device("cpu"))
    trainer.stop_at = stop_at
    trainer.fit()
    return trainer


@pytest.mark.parametrize("num_workers", [0, 1])
def test_resume_from_a_mid_epoch_checkpoint_is_exact(tmp_path, capsys, num_workers: int) -> None:
    full = _mid_epoch_run(tmp_path / "full", num_workers)
    # 4 iterations per epoch, a checkpoint every 2: interrupted before step 7 (epoch 2,
    # iteration 4), the last checkpoint is the one after step 6 (epoch 2, iteration 2)
    with pytest.raises(Interrupt):
        _mid_epoch_run(tmp_path / "cut", num_workers, stop_at=7)
    saved = load_checkpoint(tmp_path / "cut" / "checkpoint-last.pt")
    assert saved["step"] == 6 and saved["epoch"] == 0 and saved["mid_epoch"]["iter"] == 2
    from hatcore.checkpoint import describe_checkpoint

    assert "step: 6  (mid-epoch: 2 iterations into the next epoch)" in describe_checkpoint(
        tmp_path / "cut" / "checkpoint-last.pt")
    capsys.readouterr()
    resumed = _mid_epoch_run(tmp_path / "cut", num_workers)
    assert "resuming float in epoch 2/2 after iteration 2/4" in capsys.readouterr().out
    assert resumed.step == full.step == 8
    assert_same_tensors(full.raw_model.state_dict(), resumed.raw_model.state_dict())
    assert_same_tensors(full.ema.module.state_dict(), resumed.ema.module.state_dict())
    assert_same_optimizer(full.optimizer, resumed.optimizer)
    # the epoch's mean losses include the iterations trained before the interruption
    for key in ("loss", "loss_box", "loss_cls"):
        assert resumed.history[-1][key] == full.history[-1][key], key
    last = load_checkpoint(tmp_path / "cut" / "checkpoint-last.pt")
    assert last["mid_epoch"] is None and last["epoch"] == 1


def test_mid_epoch_checkpoints_are_written_every_n_iterations(tmp_path, monkeypatch) -> None:
    import hatcore.trainer as trainer_mod

    saved: list[tuple[str, int, Any]] = []
    real = trainer_mod.save_checkpoint

    def recording(path: Path, payload: dict[str, Any]) -> None:
        saved.append((Path(path).name, payload.get("step", -1), payload.get("mid_epoch")))
        real(path, payload)

    monkeypatch.setattr(trainer_mod, "save_checkpoint", recording)
    _mid_epoch_run(tmp_path, 0)
    last = [(step, pos["iter"] if pos else None) for name, step, pos in saved
            if name == "checkpoint-last.pt"]
    assert last == [(2, 2), (4, None), (6, 2), (8, None)]


def test_a_negative_checkpoint_interval_is_a_user_error(tmp_path) -> None:
    with pytest.raises(UserError, match="checkpoint_every_iters = -1"):
        Trainer(stage="float", model=ToyDetector(), cfg=TrainStage(checkpoint_every_iters=-1),
                train_loader=toy_loader(), out_dir=tmp_path, device=torch.device("cpu"))


# --------------------------------------------------------------------------- deterministic


@pytest.fixture
def restore_determinism():  # type: ignore[no-untyped-def]
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
              torch.utils.deterministic.fill_uninitialized_memory)
    torch.utils.deterministic.fill_uninitialized_memory = True  # torch's default
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]
    torch.utils.deterministic.fill_uninitialized_memory = before[4]


TOY_RECIPE = """
[task]
name = "toy"
work_dir = "{work}"
device = "cpu"
deterministic = {deterministic}

[model]
type = "toy_detector"

[data.train]
type = "toy_squares"
length = 8
batch_size = 4

[data.val]
type = "toy_squares"
length = 4
batch_size = 4
"""


@pytest.mark.parametrize("flag", [True, False])
def test_task_deterministic_is_applied_to_torch(tmp_path, toy_plugins, restore_determinism,
                                                 flag: bool) -> None:
    from hatcore.pipeline import Pipeline

    torch.use_deterministic_algorithms(not flag)
    torch.backends.cudnn.benchmark = flag
    path = tmp_path / "toy.toml"
    path.write_text(TOY_RECIPE.format(work=tmp_path / "run", deterministic=str(flag).lower()))
    Pipeline.load(path)
    assert torch.are_deterministic_algorithms_enabled() is flag
    assert torch.backends.cudnn.deterministic is flag and torch.backends.cudnn.benchmark is not flag
    # and new tensors are not NaN-filled (torch's default under deterministic algorithms):
    # the fill is a full extra write of every activation
    assert torch.utils.deterministic.fill_uninitialized_memory is False


def test_deterministic_mode_warns_instead_of_failing_on_an_op_without_a_deterministic_kernel(
        restore_determinism) -> None:
    configure_determinism(True)
    if not torch.cuda.is_available():
        # CPU kernels of the ops that trainers use are deterministic; the policy is warn-only
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        return
    x = torch.zeros(8, device="cuda")
    with pytest.warns(UserWarning, match="does not have a deterministic implementation"):
        x.index_add_(0, torch.zeros(4, dtype=torch.long, device="cuda"),
                     torch.ones(4, device="cuda"))


def test_calibration_is_seeded_so_a_redone_calibration_observes_the_same_batches(tmp_path) -> None:
    from hatcore.trainer import calibrate

    seen: list[list[torch.Tensor]] = [[], []]
    for run in range(2):
        torch.manual_seed(run)  # whatever the RNGs held before (another stage trained, or none)
        model = ToyDetector()
        model.register_forward_pre_hook(lambda m, args, run=run: seen[run].append(args[0].clone()))
        calibrate(model, toy_loader(), batches=3, device=torch.device("cpu"), seed=7)
    assert len(seen[0]) == 3
    for a, b in zip(*seen, strict=True):
        assert torch.equal(a, b)


def test_log_lines_of_a_resumed_run_count_each_epoch_once(tmp_path) -> None:
    with pytest.raises(Interrupt):
        _mid_epoch_run(tmp_path / "cut", 0, stop_at=7)
    _mid_epoch_run(tmp_path / "cut", 0)
    lines = [json.loads(x) for x in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines if x["kind"] == "epoch"] == [0, 1]
