"""Atomic checkpoints and the backend-neutral quantization vocabulary."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hatcore import quant
from hatcore.checkpoint import load_checkpoint, save_checkpoint
from hatcore.errors import UserError


def test_checkpoint_round_trip_and_refusals(tmp_path) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"model": {"w": torch.arange(4.0)}, "epoch": 1})
    data = load_checkpoint(path)
    assert torch.equal(data["model"]["w"], torch.arange(4.0)) and data["epoch"] == 1
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a HAT checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(UserError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "none.pt")


def test_a_failed_write_keeps_the_old_checkpoint(tmp_path) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(1)}})

    class Boom:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        save_checkpoint(path, {"model": {"w": Boom()}})
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(1))
    assert list(tmp_path.iterdir()) == [path]


def test_stubs_are_identity_and_hints_merge() -> None:
    x = torch.randn(2, 3)
    assert torch.equal(quant.QuantStub(scale=1 / 128)(x), x)
    assert torch.equal(quant.DeQuantStub()(x), x)
    conv = nn.Conv2d(1, 1, 1)
    quant.set_hint(conv, out_dtype="int16")
    quant.set_hint(conv, float=False)
    assert quant.get_hints(conv) == {"out_dtype": "int16", "float": False}
    assert quant.get_hints(nn.ReLU()) == {}


def test_set_mode_reaches_every_participating_module() -> None:
    seen = []

    class Observer(nn.Module):
        def hat_set_mode(self, mode: str) -> None:
            seen.append(mode)

    model = nn.Sequential(Observer(), nn.Sequential(Observer()), nn.ReLU())
    quant.set_mode(model, "observe")
    assert seen == ["observe", "observe"]
    with pytest.raises(ValueError, match="quant mode must be one of observe, fake_quant, qat"):
        quant.set_mode(model, "train")
