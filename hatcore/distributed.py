"""torch.distributed helpers: torchrun environment, DDP/SyncBN wrapping, gathering, launching.

Everything here is a no-op on a single process, so callers never branch on it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def world_size() -> int:
    """Processes in the job (``WORLD_SIZE`` from torchrun before init)."""
    return tdist.get_world_size() if is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return tdist.get_rank() if is_initialized() else int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def init() -> None:
    """Join the process group torchrun described (gloo on CPU, nccl on CUDA); else nothing."""
    if world_size() <= 1 or is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    tdist.init_process_group(backend=backend)


def barrier() -> None:
    if is_initialized():
        tdist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order (``[obj]`` on one process)."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


def wrap(model: nn.Module, device: torch.device, sync_bn: bool) -> nn.Module:
    """DDP (and SyncBatchNorm when asked) when running on several processes."""
    if not is_initialized() or world_size() <= 1:
        return model
    if sync_bn and device.type == "cuda":  # torch's SyncBatchNorm runs on CUDA only
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif sync_bn and is_main():
        print("hat: sync_bn needs CUDA; on CPU, BN statistics follow rank 0 (DDP broadcasts them)",
              file=sys.stderr)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def launch(nproc: int, argv: list[str]) -> int:
    """Re-run ``hat ARGV`` on ``nproc`` local processes with torchrun; returns its exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "hatcore", *argv]
    return subprocess.call(cmd)
