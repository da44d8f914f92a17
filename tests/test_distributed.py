"""torch.distributed helpers: single-process no-ops, the torchrun command, a 2-process gloo run."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from hat_toy.plugin import ToyDataset, ToyDetector
from torch import nn

from hatcore import distributed as dist


def test_one_process_helpers_are_no_ops(monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    dist.init()
    assert not dist.is_initialized()
    assert (dist.world_size(), dist.rank(), dist.is_main()) == (1, 0, True)
    assert dist.all_gather_object({"a": 1}) == [{"a": 1}]
    assert dist.broadcast_object(7) == 7
    dist.barrier()
    model = ToyDetector()
    assert dist.wrap(model, torch.device("cpu"), sync_bn=True) is model
    assert dist.unwrap(model) is model
    assert dist.train_sampler(ToyDataset(32, 4, 2, 0, []), shuffle=True, seed=0) is None


def test_torchrun_environment_is_read_before_init(monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert (dist.world_size(), dist.rank(), dist.local_rank(), dist.is_main()) == (4, 3, 1, False)
    sampler = dist.train_sampler(ToyDataset(32, 10, 2, 0, []), shuffle=False, seed=0)
    assert isinstance(sampler, torch.utils.data.DistributedSampler)
    assert list(sampler) == [3, 7, 1]  # rank 3 of 4: 10 items padded to 12 by wrapping


def test_sync_bn_converts_on_cuda_only() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    assert isinstance(dist.convert_sync_bn(model, torch.device("cpu"))[1], nn.BatchNorm2d)
    converted = dist.convert_sync_bn(model, torch.device("cuda"))
    assert isinstance(converted[1], nn.SyncBatchNorm)


def test_launch_reruns_hat_under_torchrun() -> None:
    cmd = dist.launch_command(2, ["run", "r.toml", "--stage", "float"])
    assert cmd == [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc_per_node=2", "-m", "hatcore", "run", "r.toml", "--stage", "float"]


def test_two_processes_train_to_identical_weights_and_stop_together(tmp_path) -> None:
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), str(tmp_path)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert a["epochs"] == b["epochs"] == 2  # rank 0 alone asked to stop after epoch 2 of 4
    assert a["params"].keys() == b["params"].keys()
    assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])
    assert a["gathered"] == b["gathered"] == [0, 1]
    assert a["loss"] == b["loss"]  # the epoch's mean loss is over both processes
    out = tmp_path / "out"
    assert (out / "checkpoint-last.pt").is_file() and (out / "checkpoint-best.pt").is_file()
    epochs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in epochs if x["kind"] == "epoch"] == [0, 1]  # rank 0 logs alone
    # 16 images, 2 per process per step: 4 steps per epoch, img/s counts both processes
    assert a["step"] == 8


DDP_SCRIPT = """
import os
import sys
from pathlib import Path
import torch
from torch.utils.data import DataLoader
from hat_toy.plugin import ToyDataset, ToyDetector
from hatcore import distributed as dist, hookimpl
from hatcore.plugins import make_plugin_manager
from hatcore.recipe import TrainStage, Optimizer
from hatcore.trainer import Trainer

class StopOnRank0:
    @hookimpl
    def on_epoch_end(self, trainer, epoch, metrics):
        if dist.is_main() and epoch == 1:
            trainer.should_stop = True

out = Path(sys.argv[1])
dist.init()
assert dist.world_size() == 2 and dist.is_initialized()
torch.manual_seed(0)
ds = ToyDataset(32, 16, 2, 0, [])
loader = DataLoader(ds, batch_size=2, sampler=dist.train_sampler(ds, shuffle=True, seed=0),
                    collate_fn=ds.collate_fn)
cfg = TrainStage(epochs=4, optimizer=Optimizer(lr=0.05), sync_bn=True, log_interval=0)
plugins = make_plugin_manager(entrypoints=False, extra=[("stop", StopOnRank0())])
trainer = Trainer(stage="float", model=ToyDetector(), cfg=cfg, train_loader=loader,
                  out_dir=out / "out", device=torch.device("cpu"), hook=plugins.hook)
assert isinstance(trainer.model, torch.nn.parallel.DistributedDataParallel)
trainer.fit()
# parameters only: BN running stats follow each rank's last batch (DDP broadcasts rank 0's
# buffers at the start of every forward), parameters must be identical
params = {k: v.detach() for k, v in trainer.raw_model.named_parameters()}
torch.save({"params": params, "epochs": trainer.epoch, "step": trainer.step,
            "loss": trainer.history[-1]["loss"],
            "gathered": dist.all_gather_object(dist.rank())}, out / f"rank{dist.rank()}.pt")
# tear down in order: the DDP model (its reducer holds the process group) before the group
del trainer
dist.shutdown()
# leave without the interpreter's teardown: on rare runs a gloo/DDP thread still alive there
# aborted the process ("terminate called without an active exception") after everything above
# had been written; this test checks training, not teardown order
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
"""
