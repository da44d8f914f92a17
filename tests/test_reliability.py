"""docs/reliability.md, one test per row: a bad input or a fault, and what the user sees.

"What the user sees" is the message of the ``UserError`` (``hat`` prints it as
``hat: error: MESSAGE`` and exits 2, without a traceback: tests/test_cli.py), or the command's
own output where the row is about a command. The kill -9 row and the damaged-artifact row are in
tests/test_reliability_kill.py (they share one real run of the demo recipe).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from hat_toy.plugin import ToyDataset, ToyDetector, ToyFlip
from torch.utils.data import DataLoader

from hatcore.checkpoint import load_checkpoint, save_checkpoint
from hatcore.errors import RecipeError, UserError
from hatcore.plugins import make_plugin_manager, set_plugins
from hatcore.recipe import Optimizer, TrainStage, load_recipe
from hatcore.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent

TOY = """\
[task]
name = "toy"
work_dir = "{work}"
device = "cpu"

[model]
type = "toy_detector"

[data.train]
type = "toy_squares"
length = {length}
batch_size = 4
transforms = [{{ type = "toy_flip" }}]

[data.val]
type = "toy_squares"
length = 4
batch_size = 4

[metric]
type = "toy_hits"

[stages.float]
epochs = 2
checkpoint_every_iters = 1
optimizer = {{ lr = 0.05 }}

[stages.calibration]
enabled = false

[stages.qat]
enabled = false

[predict]
stages = ["float"]
vis_images = 0
"""


def toy_recipe(tmp_path: Path, text: str | None = None, length: int = 16) -> Path:
    path = tmp_path / "toy.toml"
    path.write_text(text if text is not None else TOY.format(work=tmp_path / "run", length=length))
    return path


def recipe_errors(tmp_path: Path, text: str, registry: Any) -> str:
    with pytest.raises(RecipeError) as err:
        load_recipe(toy_recipe(tmp_path, text), registry)
    return str(err.value)


def toy_trainer(out: Path, model: torch.nn.Module | None = None, epochs: int = 2) -> Trainer:
    torch.manual_seed(0)
    ds = ToyDataset(size=32, length=8, num_classes=2, seed=0, transforms=[ToyFlip(0.5)])
    loader = DataLoader(ds, batch_size=4, shuffle=True, collate_fn=ds.collate_fn, drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    return Trainer(stage="float", model=model or ToyDetector(), train_loader=loader, out_dir=out,
                   cfg=TrainStage(epochs=epochs, optimizer=Optimizer(lr=0.05)),
                   device=torch.device("cpu"))


# --------------------------------------------------------------------------- recipes


def test_malformed_toml_is_reported_with_line_and_column(tmp_path, toy_plugins) -> None:
    msg = recipe_errors(tmp_path, '[task]\nname = "toy"\nwork_dir = runs/x\n', toy_plugins.registry)
    assert f"{tmp_path / 'toy.toml'}: 1 error in recipe" in msg
    assert "not valid TOML" in msg and "line 3, column 12" in msg


def test_an_unknown_key_is_named_with_its_path_and_a_suggestion(tmp_path, toy_plugins) -> None:
    text = TOY.format(work=tmp_path, length=16).replace("epochs = 2", "epoch = 2")
    msg = recipe_errors(tmp_path, text, toy_plugins.registry)
    assert "$.stages.float.epoch: unknown key 'epoch'; did you mean 'epochs'?" in msg


def test_a_wrong_type_names_the_key_the_value_and_the_expected_type(tmp_path, toy_plugins) -> None:
    text = TOY.format(work=tmp_path, length='"many"')
    msg = recipe_errors(tmp_path, text, toy_plugins.registry)
    assert "$.data.train.length: expected an integer, got 'many'" in msg


def test_an_unknown_type_name_lists_the_valid_names(tmp_path, toy_plugins) -> None:
    text = TOY.format(work=tmp_path, length=16).replace('"toy_flip"', '"toy_flop"')
    msg = recipe_errors(tmp_path, text, toy_plugins.registry)
    assert "$.data.train.transforms[0].type: unknown transform type 'toy_flop'" in msg
    assert "toy_flip" in msg


# --------------------------------------------------------------------------- data


def test_a_missing_data_path_is_named_before_training(tmp_path) -> None:
    pytest.importorskip("hat_coco")
    from hatcore.pipeline import Pipeline

    missing = tmp_path / "nowhere" / "train_lmdb"
    text = TOY.format(work=tmp_path / "run", length=16).replace(
        'type = "toy_squares"\nlength = 16\nbatch_size = 4\ntransforms = [{ type = "toy_flip" }]',
        f'type = "coco_lmdb"\npath = "{missing}"')
    set_plugins(make_plugin_manager(only={"toy", "hat-coco"}))
    try:
        pipe = Pipeline.load(toy_recipe(tmp_path, text))
        with pytest.raises(UserError, match=f"{missing}: no such LMDB; pack one with `hat pack coco`"):
            pipe.loader("train")
    finally:
        set_plugins(None)
    assert not (tmp_path / "run" / "float").exists()  # nothing trained


def test_an_empty_training_set_stops_the_stage_with_a_message(tmp_path, toy_plugins) -> None:
    from hatcore.pipeline import Pipeline

    pipe = Pipeline.load(toy_recipe(tmp_path, length=2))  # 2 images, batches of 4
    with pytest.raises(UserError, match="float: the training set gives no batch"):
        pipe.run(["float"])


def test_a_corrupt_lmdb_record_while_training_names_the_record(tmp_path) -> None:
    """Stopped, not skipped (documented): the image bytes fail to decode in a loader worker,
    and the message names the LMDB and the record, without the worker's traceback."""
    pytest.importorskip("hat_coco")
    import lmdb

    from hatcore.pipeline import Pipeline

    lmdb_dir = tmp_path / "train_lmdb"
    text = TOY.format(work=tmp_path / "run", length=16).replace(
        'type = "toy_squares"\nlength = 16\nbatch_size = 4\ntransforms = [{ type = "toy_flip" }]',
        f'type = "coco_lmdb"\npath = "{lmdb_dir}"\nbatch_size = 2\nnum_workers = 1\nshuffle = false\n'
        'transforms = [{ type = "to_tensor" }]\n'
        f'source = {{ type = "shapes", root = "{tmp_path / "shapes"}", num_images = 6, '
        'image_size = 64, seed = 0 }')
    set_plugins(make_plugin_manager(only={"toy", "hat-coco"}))
    try:
        pipe = Pipeline.load(toy_recipe(tmp_path, text))
        dataset: Any = pipe.build_dataset("train")  # packs the generated images
        victim = dataset.records[3]["image_id"]
        from hat_coco.lmdb_store import close_readonly

        close_readonly()
        env = lmdb.open(str(lmdb_dir))
        with env.begin(write=True) as txn:
            txn.put(b"img/%012d" % victim, b"\xff\xd8\xff\xe0 truncated")
        env.close()
        with pytest.raises(UserError) as err:
            for _ in pipe.loader("train"):
                pass
    finally:
        set_plugins(None)
    msg = str(err.value)
    assert f"{lmdb_dir}: record 'img/{victim:012d}': corrupt JPEG" in msg
    assert "DataLoader worker process 0" in msg and "Traceback" not in msg


def test_a_checkpoint_of_another_model_names_the_mismatching_keys(tmp_path, toy_plugins) -> None:
    from hatcore.pipeline import Pipeline

    pipe = Pipeline.load(toy_recipe(tmp_path))
    other = tmp_path / "other.pt"
    state = ToyDetector(width=4).state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["cls.bias"]
    save_checkpoint(other, {"model": state})
    with pytest.raises(UserError) as err:
        pipe.load_stage_model("float", other)
    msg = str(err.value)
    assert msg.startswith(f"{other}: the checkpoint holds another model's weights")
    assert "1 missing: cls.bias" in msg and "1 unexpected: extra.weight" in msg
    assert "body.0.weight (4, 3, 3, 3) vs (8, 3, 3, 3)" in msg


# --------------------------------------------------------------------------- plugins


def test_a_plugin_that_raises_on_import_is_named_others_load_and_hat_plugins_shows_it(
        tmp_path, monkeypatch, capsys) -> None:
    from importlib.metadata import EntryPoint

    import hatcore.plugins as plugins_mod
    from hatcore.cli import cli

    (tmp_path / "hat_raising_plugin.py").write_text(
        'raise RuntimeError("this plugin is broken on purpose")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    broken = EntryPoint(name="raising", value="hat_raising_plugin", group="hat")
    real = plugins_mod.entry_points
    monkeypatch.setattr(plugins_mod, "entry_points", lambda group: [*real(group=group), broken])
    set_plugins(make_plugin_manager(only={"toy", "raising"}))
    try:
        result = CliRunner().invoke(cli, ["plugins"])
    finally:
        set_plugins(None)
    assert result.exit_code == 0, result.output
    assert "plugin 'raising' (?) failed to load: RuntimeError: this plugin is broken on purpose" \
        in capsys.readouterr().err  # said once, when the plugins load
    assert "raising  FAILED TO LOAD: RuntimeError: this plugin is broken on purpose" in result.stdout
    assert "toy  (hat-toy" in result.stdout and "model:toy_detector" in result.stdout


# --------------------------------------------------------------------------- training faults


class NaNAtStep(ToyDetector):
    """A toy whose loss is NaN from the ``at``-th training forward on (a diverging run)."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at, self.calls = at, 0

    def compute_loss(self, raw: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        self.calls += 1
        losses = super().compute_loss(raw, batch)
        if self.calls >= self.at:
            losses["loss_box"] = losses["loss_box"] * float("nan")
        return losses


def test_a_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path) -> None:
    trainer = toy_trainer(tmp_path, NaNAtStep(at=4), epochs=3)  # 2 steps per epoch
    with pytest.raises(UserError) as err:
        trainer.fit()
    msg = str(err.value)
    # steps count from 0: steps 0-2 trained, step 3 (the 4th forward) is NaN
    assert msg.startswith("float: the loss is not finite at step 3 (epoch 2): loss_box = nan,")
    assert "checkpoint-last.pt holds the last good epoch" in msg
    saved = load_checkpoint(tmp_path / "checkpoint-last.pt")
    assert saved["epoch"] == 0 and saved["step"] == 2
    for k, v in trainer.raw_model.state_dict().items():  # the NaN step changed nothing
        assert torch.isfinite(v.float()).all(), k
        if k.endswith("weight") and "body.1" not in k:
            assert not torch.equal(v, saved["model"][k]), k  # step 3 did train after the save


def test_disk_full_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch) -> None:
    import hatcore.checkpoint as ckpt

    trainer = toy_trainer(tmp_path, epochs=2)
    real_save = ckpt.torch.save
    writes = []

    def filling_disk(obj: Any, f: Any) -> None:
        writes.append(1)
        if obj.get("epoch") == 1:
            f.write(b"x" * 100)  # part of it got out before the disk filled
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, f)

    monkeypatch.setattr(ckpt.torch, "save", filling_disk)
    with pytest.raises(UserError) as err:
        trainer.fit()
    last = tmp_path / "checkpoint-last.pt"
    assert str(err.value) == (f"{last}: cannot write the checkpoint: the disk is full; the "
                              "previous checkpoint-last.pt is intact. Free some space and run the "
                              "same command again to resume")
    assert load_checkpoint(last)["epoch"] == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".tmp") == []
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    resumed = toy_trainer(tmp_path, epochs=2)
    resumed.fit()
    assert load_checkpoint(last)["epoch"] == 1 and resumed.step == 4


def hat(cwd: Path, *args: str, kill_at: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HAT_KILL_AT", None)
    if kill_at:
        env["HAT_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, str(ROOT / "tests" / "killpoint.py"), *args],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_ctrl_c_stops_cleanly_and_the_rerun_resumes_to_the_same_weights(tmp_path,
                                                                        toy_plugins) -> None:
    from hatcore.pipeline import Pipeline

    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    for d in (full_dir, cut_dir):
        d.mkdir()
        toy_recipe(d)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1): CPU kernels split their
    try:  # reductions by thread, so bit-equal weights need the same thread count
        Pipeline.load(full_dir / "toy.toml").run(["float"])  # uninterrupted
    finally:
        torch.set_num_threads(threads)
    cut = hat(cut_dir, "run", "toy.toml", kill_at="float:6:INT")  # 4 steps an epoch: in epoch 2
    assert cut.returncode == 130, cut.stderr[-3000:]
    assert "hat: interrupted (run the same command again to resume)\n" in cut.stderr
    assert "Traceback" not in cut.stderr
    again = hat(cut_dir, "run", "toy.toml")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming float in epoch 2/2 after iteration 1/4" in again.stdout
    a = load_checkpoint(full_dir / "run" / "float" / "checkpoint-last.pt")["model"]
    b = load_checkpoint(cut_dir / "run" / "float" / "checkpoint-last.pt")["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_every_test_named_in_docs_reliability_exists() -> None:
    import re

    text = (ROOT / "docs" / "reliability.md").read_text()
    named = re.findall(r"`([\w/.-]+\.py)::(\w+)`", text)
    rows = [line for line in text.splitlines() if line.startswith("| ") and "::" in line]
    assert len(rows) >= 15 and len(named) >= len(rows)
    for path, name in named:
        assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.M), (path, name)
