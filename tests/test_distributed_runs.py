"""Real ranks on this machine (gloo, CPU, one thread each): multi-node torchrun, DDP-correct FCOS
losses, distributed evaluation, and SIGKILL mid-epoch on 2 processes.

The demo recipe at 64-pixel images, a few iterations; every run reads one shapes data set
(generated and packed by the first run, shared through a symlink). One uninterrupted 2-process
single-node run (the module fixture) is the reference the others must reproduce.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
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
    "data.train.source.num_images=16", "data.val.source.num_images=9",  # 9: rank 1 gets a repeat
    "data.train.batch_size=2", "data.val.batch_size=4", "data.train.num_workers=0",
    "data.train.transforms.0.img_scale=[64, 64]", "data.train.transforms.1.size=[64, 64]",
    "data.train.transforms.2.divisor=64", "data.val.transforms.0.img_scale=[64, 64]",
    "data.val.transforms.1.divisor=64", "export.input_shape=[1, 3, 64, 64]",
    "stages.float.epochs=2", "stages.float.max_iters_per_epoch=3",
    "stages.float.checkpoint_every_iters=2", "model.decoder.score_thr=0.001",
    'predict.stages=["float"]', "predict.vis_images=0",
]
SETS = [a for s in TINY for a in ("--set", s)]
FLOAT = ["run", "recipes/demo.toml", "--stage", "float", *SETS]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
SINGLE_NODE = [*TORCHRUN, "--standalone", "--nproc-per-node=2"]


def env(kill_at: str | None = None) -> dict[str, str]:
    out = {**os.environ, "OMP_NUM_THREADS": "1"}  # 2 ranks on 2 cores
    out.pop("HAT_KILL_AT", None)
    if kill_at:
        out["HAT_KILL_AT"] = kill_at
    return out


def run(cwd: Path, cmd: list[str], kill_at: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env(kill_at),
                          timeout=300)


def new_cwd(base: Path, name: str) -> Path:
    """A folder with the recipes and the shared data set (a symlink: one data set for all)."""
    cwd = base / name
    cwd.mkdir()
    shutil.copytree(ROOT / "recipes", cwd / "recipes")
    (base / "tmp_data").mkdir(exist_ok=True)
    (cwd / "tmp_data").symlink_to(base / "tmp_data", target_is_directory=True)
    return cwd


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ranks")


@pytest.fixture(scope="module")
def reference(base: Path) -> Path:
    """An uninterrupted 2-process single-node run of float (and predict float); its work dir."""
    cwd = new_cwd(base, "reference")
    proc = run(cwd, [*SINGLE_NODE, "-m", "hatcore", *FLOAT, "--stage", "predict"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return cwd / "runs" / "demo"


def checkpoint(work: Path, name: str = "checkpoint-last.pt") -> dict:
    return torch.load(work / "float" / name, map_location="cpu", weights_only=True)


def losses(ckpt: dict) -> list[dict]:
    """The epoch records of a checkpoint's history without the timings."""
    return [{k: v for k, v in h.items() if k not in TIMINGS} for h in json.loads(ckpt["history"])]


TIMINGS = ("img_s", "epoch_time", "data_wait", "data_wait_s", "first_batch_s", "train_img_s",
           "loader_img_s", "loader_ratio")


def assert_same_model(a: dict, b: dict) -> None:
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_two_nodes_of_one_process_train_like_one_node_of_two(reference, base) -> None:
    """Two torchrun invocations (the two "nodes"), c10d rendezvous on 127.0.0.1, one work dir."""
    cwd = new_cwd(base, "nodes")
    port = free_port()
    procs = [subprocess.Popen(
        [*TORCHRUN, "--nnodes=2", f"--node-rank={node}", "--nproc-per-node=1",
         "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=hat-test",
         "-m", "hatcore", *FLOAT], cwd=cwd, env=env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-4000:]
    work = cwd / "runs" / "demo"
    ref, got = checkpoint(reference), checkpoint(work)
    assert got["step"] == ref["step"] == 6  # 16 images / (2 ranks x batch 2) capped at 3, x 2
    assert_same_model(ref, got)
    assert losses(got) == losses(ref)  # epoch losses averaged over both ranks alike
    assert_same_model(checkpoint(reference, "checkpoint-best.pt"),
                      checkpoint(work, "checkpoint-best.pt"))
    said = "".join(err for _, err in outs)
    assert said.count("float: training the floating-point model") == 1  # rank 0 alone prints


def test_two_processes_killed_mid_epoch_resume_to_the_uninterrupted_weights(reference, base):
    cwd = new_cwd(base, "killed")
    work = cwd / "runs" / "demo"
    # before the 6th training forward of each rank: the checkpoint of step 4 (epoch 2, after
    # iteration 1 of 3) is the last one written
    killed = run(cwd, [*SINGLE_NODE, str(ROOT / "tests" / "killpoint.py"), *FLOAT],
                 kill_at="float:6")
    assert killed.returncode != 0, killed.stderr[-3000:]
    mid = checkpoint(work)["mid_epoch"]
    assert (mid["iter"], mid["world_size"], len(mid["ranks"])) == (1, 2, 2)
    assert not torch.equal(mid["ranks"][0]["rng"]["torch"], mid["ranks"][1]["rng"]["torch"])
    resumed = run(cwd, [*SINGLE_NODE, "-m", "hatcore", *FLOAT])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    said = resumed.stdout + resumed.stderr
    assert "resuming float in epoch 2/2 after iteration 1/3" in said
    assert said.count("resuming float") == 1  # said once, by rank 0
    ref, got = checkpoint(reference), checkpoint(work)
    assert_same_model(ref, got)
    assert got["step"] == ref["step"]
    assert losses(got) == losses(ref)  # each rank's running loss sums were restored


def test_distributed_evaluation_equals_one_process(reference, base) -> None:
    """predict float of the 2-process run (each rank half the val set, padded with a repeat)
    against `hat predict` of the same checkpoint on one process."""
    cwd = new_cwd(base, "predict")
    shutil.copytree(reference, cwd / "runs" / "demo")
    ckpt = cwd / "runs" / "demo" / "float" / "checkpoint-best.pt"
    proc = run(cwd, [sys.executable, "-m", "hatcore", "predict", "recipes/demo.toml",
                     "--stage", "float", "--ckpt", str(ckpt), *SETS])
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = cwd / "runs" / "demo" / "predict" / "float"
    two = reference / "predict" / "float"
    dets_one = json.loads((one / "detections.json").read_text())
    dets_two = json.loads((two / "detections.json").read_text())
    assert len({d["image_id"] for d in dets_one}) == 9  # every val image has detections

    def same_order(dets: list[dict]) -> list[str]:  # "id": pycocotools numbers them in order
        return sorted(json.dumps({k: v for k, v in d.items() if k != "id"}, sort_keys=True)
                      for d in dets)

    assert same_order(dets_two) == same_order(dets_one)  # each once, none lost
    assert json.loads((two / "metrics.json").read_text())["bbox"] == \
        json.loads((one / "metrics.json").read_text())["bbox"]


def test_fcos_losses_of_2_processes_x_batch_2_equal_1_process_x_batch_4(tmp_path) -> None:
    """The positives and the box-loss weights are normalised over the global batch."""
    script, steps = str(ROOT / "tests" / "ddp_fcos_steps.py"), 3
    one = run(tmp_path, [sys.executable, script, str(tmp_path), "4", str(steps)])
    assert one.returncode == 0, one.stderr[-3000:]
    two = run(tmp_path, [*SINGLE_NODE, script, str(tmp_path), "4", str(steps)])
    assert two.returncode == 0, two.stderr[-3000:]
    a = torch.load(tmp_path / "w1.pt", weights_only=True)
    b = torch.load(tmp_path / "w2.pt", weights_only=True)
    assert len(a["losses"]) == len(b["losses"]) == steps
    for s in range(steps):
        torch.testing.assert_close(b["losses"][s], a["losses"][s], rtol=1e-5, atol=1e-6)
        # per-rank normalisers would be off by ~1e-2 here; summation order costs ~1e-6
        torch.testing.assert_close(b["grads"][s], a["grads"][s], rtol=1e-4, atol=1e-5)
    for k in a["params"]:
        torch.testing.assert_close(b["params"][k], a["params"][k], rtol=1e-4, atol=1e-5)
