"""Built-in callbacks: an ordinary plugin printing the epoch summary and writing TensorBoard."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from hatcore import callbacks
from hatcore.plugins import BUILTIN_PLUGINS, make_plugin_manager


def fake_trainer(tmp_path: Path) -> Any:
    return SimpleNamespace(stage="qat", cfg=SimpleNamespace(epochs=3, log_interval=2),
                           out_dir=tmp_path, epoch=1, iters_per_epoch=4)


@pytest.fixture(autouse=True)
def fresh_writers() -> Any:
    callbacks._writers.clear()
    yield
    for w in callbacks._writers.values():
        if w is not None and hasattr(w, "close"):
            w.close()
    callbacks._writers.clear()


def test_callbacks_are_an_ordinary_builtin_plugin() -> None:
    assert "hatcore.callbacks" in BUILTIN_PLUGINS
    plugins = make_plugin_manager(entrypoints=False)
    impls = plugins.pm.hook.on_epoch_end.get_hookimpls()
    assert "hatcore.callbacks" in [i.plugin_name for i in impls]


def test_epoch_summary_line(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # not installed
    metrics = {"loss": 1.23456, "lr": 0.0005, "AP": 0.4321, "epoch": 1, "note": "x"}
    callbacks.on_epoch_end(trainer=fake_trainer(tmp_path), epoch=1, metrics=metrics)
    assert capsys.readouterr().out == "qat epoch 2/3: loss 1.235  lr 5.00e-04  AP 43.21\n"
    assert not (tmp_path / "tb").exists()


def test_tensorboard_scalars_when_installed(tmp_path, monkeypatch) -> None:
    written: list[tuple[str, float, int]] = []

    class SummaryWriter:
        def __init__(self, logdir: str) -> None:
            self.logdir = logdir

        def add_scalar(self, tag: str, value: float, step: int) -> None:
            written.append((tag, value, step))

        def flush(self) -> None:
            written.append(("flush", 0.0, 0))

    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = SummaryWriter  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    trainer = fake_trainer(tmp_path)
    callbacks.on_epoch_end(trainer=trainer, epoch=0, metrics={"loss": 2.0, "AP": 0.1, "epoch": 0})
    callbacks.on_epoch_end(trainer=trainer, epoch=1, metrics={"loss": 1.0, "epoch": 1})
    assert written == [("qat/loss", 2.0, 1), ("qat/AP", 10.0, 1), ("flush", 0.0, 0),
                       ("qat/loss", 1.0, 2), ("flush", 0.0, 0)]
    assert callbacks._writers[str(tmp_path / "tb")].logdir == str(tmp_path / "tb")


def test_hook_on_iter_end_writes_real_tensorboard_scalars(tmp_path, monkeypatch) -> None:
    """With the real ``tensorboard`` package (``hatcore[tb]``, installed by ``make setup``):
    the event files hold the per-iteration and per-epoch scalars, read back by TensorBoard."""
    pytest.importorskip("tensorboard", reason="pip install hatcore[tb] (make setup does)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setattr(callbacks, "interactive", lambda: True)
    plugins = make_plugin_manager(entrypoints=False)
    trainer = fake_trainer(tmp_path)
    for step, loss in ((5, 2.5), (6, 2.0)):
        returned = plugins.hook.on_iter_end(trainer=trainer, step=step,
                                            metrics={"loss": loss, "lr": 0.01 * step})
        assert returned == []  # a broadcast hook: the built-in callbacks return nothing
    plugins.hook.on_epoch_end(trainer=trainer, epoch=1, metrics={"loss": 2.25, "AP": 0.4321,
                                                                 "epoch": 1})
    callbacks._writers[str(tmp_path / "tb")].close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()

    def series(tag: str) -> list[tuple[int, float]]:
        return [(e.step, round(e.value, 4)) for e in events.Scalars(tag)]

    assert series("qat/iter/loss") == [(5, 2.5), (6, 2.0)]
    assert series("qat/iter/lr") == [(5, 0.05), (6, 0.06)]
    assert series("qat/loss") == [(2, 2.25)] and series("qat/AP") == [(2, 43.21)]  # points


def test_without_a_terminal_one_line_every_log_interval(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setattr(callbacks, "interactive", lambda: False)
    trainer = fake_trainer(tmp_path)  # log_interval 2, 4 iterations per epoch, in epoch 2
    for step in range(5, 9):
        callbacks.on_iter_end(trainer=trainer, step=step, metrics={"loss": step / 10, "lr": 1e-3})
    assert capsys.readouterr().err.splitlines() == [
        "qat 2/3 iter 2/4: loss 0.6  lr 1.00e-03", "qat 2/3 iter 4/4: loss 0.8  lr 1.00e-03"]
    monkeypatch.setattr(callbacks, "interactive", lambda: True)  # a terminal: the bar shows it
    callbacks.on_iter_end(trainer=trainer, step=6, metrics={"loss": 1.0})
    assert capsys.readouterr().err == ""


def test_progress_bars_only_on_a_terminal(monkeypatch) -> None:
    monkeypatch.setattr(callbacks, "interactive", lambda: False)
    assert callbacks.progress(range(3)).disable is True
    monkeypatch.setattr(callbacks, "interactive", lambda: True)
    bar = callbacks.progress(range(3))
    assert bar.disable is False
    bar.close()


def test_a_stage_redone_from_scratch_gets_a_new_tensorboard_writer(tmp_path) -> None:
    """StageState.start deletes a redone stage's folder: the cached writer must not write into
    the deleted events file (it raised FileNotFoundError on flush)."""
    pytest.importorskip("tensorboard", reason="pip install hatcore[tb] (make setup does)")
    import shutil

    trainer = fake_trainer(tmp_path / "qat")
    callbacks.on_epoch_end(trainer=trainer, epoch=0, metrics={"loss": 1.0, "epoch": 0})
    first = callbacks._writers[str(tmp_path / "qat" / "tb")]
    shutil.rmtree(tmp_path / "qat")
    (tmp_path / "qat").mkdir()
    callbacks.on_epoch_end(trainer=trainer, epoch=0, metrics={"loss": 2.0, "epoch": 0})
    assert callbacks._writers[str(tmp_path / "qat" / "tb")] is not first
    assert list((tmp_path / "qat" / "tb").glob("events.out.tfevents.*"))
