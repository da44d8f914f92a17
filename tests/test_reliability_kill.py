"""kill -9 in every stage, and damaged artifacts, on the demo recipe with the real plugins.

One uninterrupted reference run (module fixture) and one chain of runs in another folder, each
killed with SIGKILL at a known point of the next stage (tests/killpoint.py) and then rerun: each
rerun must skip what is done, resume or redo only the interrupted stage, and the chain must end
with exactly the reference's weights, artifacts and scores. 64-pixel images, a few iterations.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("hat_fcos")
pytest.importorskip("hat_coco")
pytest.importorskip("hat_bpu")

TINY = [
    "data.train.source.num_images=16", "data.val.source.num_images=8",
    "data.train.batch_size=4", "data.val.batch_size=4", "data.train.num_workers=0",
    "data.train.transforms.0.img_scale=[64, 64]", "data.train.transforms.1.size=[64, 64]",
    "data.train.transforms.2.divisor=64", "data.val.transforms.0.img_scale=[64, 64]",
    "data.val.transforms.1.divisor=64", "export.input_shape=[1, 3, 64, 64]",
    "stages.float.epochs=2", "stages.float.max_iters_per_epoch=3",
    "stages.float.checkpoint_every_iters=2", "stages.calibration.batches=2",
    "stages.qat.epochs=2", "stages.qat.max_iters_per_epoch=1", "quantize.freeze_bn_epoch=1",
    "predict.vis_images=0",
]
SETS = [a for s in TINY for a in ("--set", s)]
STAGES = ("float", "calibration", "qat", "export", "compile")


def hat(cwd: Path, *args: str, kill_at: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HAT_KILL_AT", None)
    if kill_at:
        env["HAT_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, str(ROOT / "tests" / "killpoint.py"), *args],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def new_run_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    cwd = tmp_path_factory.mktemp(name)
    shutil.copytree(ROOT / "recipes", cwd / "recipes")
    return cwd


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run of the whole chain; returns its work dir."""
    cwd = new_run_dir(tmp_path_factory, "reference")
    proc = hat(cwd, "run", "recipes/demo.toml", *SETS)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return cwd / "runs" / "demo"


def model_tensors(path: Path) -> dict[str, torch.Tensor]:
    data = torch.load(path, map_location="cpu", weights_only=True)
    return dict(data["model"])


def assert_same_weights(a: Path, b: Path) -> None:
    ta, tb = model_tensors(a), model_tensors(b)
    assert ta.keys() == tb.keys(), a
    for k in ta:
        assert torch.equal(ta[k], tb[k]), (a, k)


# (the stage to kill, the kill point, what the rerun that follows must say about that stage)
CHAIN = [
    ("float", "float:6", "resuming float in epoch 2/2 after iteration 1/3"),
    ("calibration", "calibration:2", "calibration: continuing an interrupted run"),
    ("qat", "qat:2", "resuming qat from epoch 2/2"),
    ("export", "export", "export: continuing an interrupted run"),
    ("compile", "compile", "compile: continuing an interrupted run"),
    ("predict", "predict", "predict float: scoring the val set"),
]


def test_kill_9_in_every_stage_resumes_or_redoes_only_that_stage(reference, tmp_path_factory):
    cwd = new_run_dir(tmp_path_factory, "killed")
    work = cwd / "runs" / "demo"
    for i, (stage, point, _) in enumerate(CHAIN):
        proc = hat(cwd, "run", "recipes/demo.toml", *SETS, kill_at=point)
        assert proc.returncode == -9, (stage, proc.returncode, proc.stderr[-3000:])
        said = proc.stdout + proc.stderr
        state = json.loads((work / ("predict/float" if stage == "predict" else stage)
                            / "stage.json").read_text())
        assert state["status"] == "running", stage  # killed inside the stage
        for done in STAGES[:max(i - 1, 0)]:  # finished by earlier runs: skipped
            assert f"{done}: done, inputs unchanged, skipped" in said, (stage, done)
        if i:  # the stage killed by the previous run is resumed or redone by this one
            assert CHAIN[i - 1][2] in said, (stage, said[-3000:])
    final = hat(cwd, "run", "recipes/demo.toml", *SETS)
    assert final.returncode == 0, final.stderr[-3000:]
    assert CHAIN[-1][2] in final.stderr
    for done in STAGES:
        assert f"{done}: done, inputs unchanged, skipped" in final.stderr, done
    assert "float 1/2" not in final.stderr  # nothing trained again

    for rel in ("float/checkpoint-last.pt", "float/checkpoint-best.pt",
                "calibration/checkpoint-best.pt", "qat/checkpoint-last.pt",
                "qat/checkpoint-best.pt"):
        assert_same_weights(reference / rel, work / rel)
    for rel in ("export/model.hbir", "compile/model.hbm"):
        assert (reference / rel).read_bytes() == (work / rel).read_bytes(), rel
    for stage in ("float", "calibration", "qat", "int_infer", "align_bpu"):
        for name in ("metrics.json", "detections.json"):
            ref = json.loads((reference / "predict" / stage / name).read_text())
            assert json.loads((work / "predict" / stage / name).read_text()) == ref, (stage, name)
    qat = torch.load(work / "qat" / "checkpoint-last.pt", weights_only=True)["model"]
    frozen = [bool(v) for k, v in qat.items() if k.endswith("bn_frozen_flag")]
    assert frozen and all(frozen)  # freeze_bn_epoch = 1 reached the resumed run
