"""torch.distributed helpers: torchrun environment, DDP/SyncBN wrapping, gathering, launching.

Everything here is a no-op on a single process, so callers never branch on it.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn


def is_initialized() -> bool:
    """True once :func:`init` joined a process group."""
    return tdist.is_available() and tdist.is_initialized()


def world_size() -> int:
    """Processes in the job (``WORLD_SIZE`` from torchrun before init)."""
    return tdist.get_world_size() if is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank (0 on one process)."""
    return tdist.get_rank() if is_initialized() else int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's rank on its machine (its GPU index)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on rank 0, which alone prints, logs and writes files."""
    return rank() == 0


def init() -> None:
    """Join the process group torchrun described (gloo on CPU, nccl on CUDA); else nothing."""
    if world_size() <= 1 or is_initialized():
        return
    backend = "gloo"
    if torch.cuda.is_available():  # CPU tensors (device = "cpu", gathered objects) go by gloo
        torch.cuda.set_device(local_rank())
        backend = "cpu:gloo,cuda:nccl"
    tdist.init_process_group(backend=backend)
    atexit.register(shutdown)  # gloo's threads must not outlive the interpreter's teardown


def shutdown() -> None:
    """Leave the process group (``destroy_process_group``); nothing when none was joined.

    Called at exit after :func:`init`: a process group left to the interpreter's teardown can
    abort it ("terminate called without an active exception") while gloo threads still run.
    """
    if is_initialized():
        tdist.destroy_process_group()


def barrier() -> None:
    """Wait for every process (nothing on one process)."""
    if is_initialized():
        tdist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order (``[obj]`` on one process)."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


def reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of ``value`` over all processes (``value`` itself on one process).

    MMDetection's ``reduce_mean``: a loss normaliser (e.g. a detector's number of positive
    points) computed from the whole global batch, so that with gradients averaged by DDP,
    ``N`` processes of batch ``B`` train like one process of batch ``N x B``. Not differentiable
    (the result is detached).
    """
    if not is_initialized() or world_size() <= 1:
        return value.detach()
    out = value.detach().clone()
    tdist.all_reduce(out, op=tdist.ReduceOp.SUM)
    return out / world_size()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every process (``obj`` itself on one process)."""
    if not is_initialized():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def train_sampler(dataset: Any, *, shuffle: bool, seed: int) -> Any:
    """A ``DistributedSampler`` (each process its share) on several processes, else ``None``.

    ``None`` lets the ``DataLoader`` use its own (random or sequential) sampler.
    """
    if world_size() <= 1:
        return None
    return torch.utils.data.DistributedSampler(dataset, num_replicas=world_size(), rank=rank(),
                                               shuffle=shuffle, seed=seed)


def convert_sync_bn(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm → SyncBatchNorm on CUDA (torch's SyncBatchNorm runs on GPUs only)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if is_main():
        print("hat: sync_bn needs CUDA; on CPU, BN statistics follow rank 0 (DDP broadcasts them)",
              file=sys.stderr)
    return model


def wrap(model: nn.Module, device: torch.device, sync_bn: bool) -> nn.Module:
    """DDP (and SyncBatchNorm when asked) when running on several processes."""
    if not is_initialized() or world_size() <= 1:
        return model
    if sync_bn:
        model = convert_sync_bn(model, device)
    ids = None
    if device.type == "cuda":
        ids = [device.index if device.index is not None else torch.cuda.current_device()]
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The task model inside a DDP wrapper (for ``compute_loss`` and ``state_dict``)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def launch_command(nproc: int, argv: list[str]) -> list[str]:
    """The torchrun command line that runs ``hat ARGV`` on ``nproc`` local processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", "-m", "hatcore", *argv]


def launch(nproc: int, argv: list[str]) -> int:
    """Re-run ``hat ARGV`` on ``nproc`` local processes with torchrun; returns its exit code.

    Each process joins the group in :func:`init` (gloo on CPU, nccl on CUDA).
    """
    return subprocess.call(launch_command(nproc, argv))
