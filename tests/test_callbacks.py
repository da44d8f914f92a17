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
    return SimpleNamespace(stage="qat", cfg=SimpleNamespace(epochs=3), out_dir=tmp_path)


@pytest.fixture(autouse=True)
def fresh_writers() -> Any:
    callbacks._writers.clear()
    yield
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
    assert written == [("qat/loss", 2.0, 1), ("qat/AP", 0.1, 1), ("flush", 0.0, 0),
                       ("qat/loss", 1.0, 2), ("flush", 0.0, 0)]
    assert callbacks._writers[str(tmp_path / "tb")].logdir == str(tmp_path / "tb")
