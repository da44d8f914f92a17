"""Float train-step speed of FCOS-EfficientNet-B0-BiFPN: bare PyTorch loop, NCHW vs channels_last.

    OMP_NUM_THREADS=2 .venv/bin/python bench/fcos_train_speed.py --size 512 --batch 8 --steps 3 --rounds 2

Reports img/s per memory format, FLOPs per image (forward, counted by ``hat_fcos.calops``; a
train step is taken as 3x forward, since ``torch.utils.flop_counter`` overcounts the backward of
depthwise convs by the group count), achieved GFLOP/s and this machine's fp32 matmul peak
measured in the same run (before and after each round). Formats are interleaved so
that CPU contention from other processes hits both alike. ``bare_train_loop`` is reusable
(e.g. to compare with the trainer).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch
from hat_fcos.calops import count_ops
from torch import nn

from hatcore.plugins import get_plugins
from hatcore.recipe import ModelSpec, make_converter


def build_model(num_classes: int = 80) -> nn.Module:
    """The seed's FCOS (Lite0 weights, BiFPN 3 stacks, 4-conv head) through the plugin hooks."""
    plugins = get_plugins()
    table = {"type": "fcos", "num_classes": num_classes,
             "backbone": {"pretrained": "efficientnet-lite0"}}
    spec = make_converter(plugins.registry).structure(table, ModelSpec)
    model = plugins.hook.build_model(spec=spec, plugins=plugins)
    assert model is not None
    return model


def synthetic_batch(batch: int, size: int, num_classes: int = 80, seed: int = 0) -> dict[str, Any]:
    """``batch`` random images with 1..8 random boxes each, in the :mod:`hatcore.data` layout."""
    g = torch.Generator().manual_seed(seed)
    boxes, labels = [], []
    for _ in range(batch):
        n = int(torch.randint(1, 9, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * size * 0.7
        wh = torch.rand(n, 2, generator=g) * size * 0.3 + 8
        boxes.append(torch.cat([xy, (xy + wh).clamp(max=size)], 1))
        labels.append(torch.randint(0, num_classes, (n,), generator=g))
    meta = [{"image_id": i, "orig_size": (size, size), "img_shape": (size, size),
             "scale": (1.0, 1.0)} for i in range(batch)]
    return {"img": torch.randn(batch, 3, size, size, generator=g).clamp(-1, 1),
            "gt_boxes": boxes, "gt_labels": labels, "meta": meta}


def bare_train_loop(model: nn.Module, batch: dict[str, Any], steps: int, warmup: int = 1,
                    channels_last: bool = False, lr: float = 0.01, **sgd: Any) -> list[float]:
    """Train ``model`` for ``warmup + steps`` SGD steps on ``batch`` (forward, ``compute_loss``,
    backward, optimizer step); returns the seconds of each timed step.

    :param sgd: more ``torch.optim.SGD`` arguments (``momentum`` defaults to 0.9).
    """
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    img = batch["img"].contiguous(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=lr, **{"momentum": 0.9, **sgd})
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        losses = model.compute_loss(model(img), batch)
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def matmul_peak(n: int = 2048, reps: int = 10) -> float:
    """fp32 GFLOP/s of an ``n x n`` matmul (best of ``reps``)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds per format")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch = synthetic_batch(args.batch, args.size)
    fwd = count_ops(build_model(), (1, 3, args.size, args.size)).total_flops
    result: dict[str, Any] = {"size": args.size, "batch": args.batch, "steps": args.steps,
                              "threads": torch.get_num_threads(),
                              "forward_gflops_per_img": fwd / 1e9,
                              "train_gflops_per_img": 3 * fwd / 1e9}
    peaks = [matmul_peak()]
    times: dict[str, list[float]] = {"nchw": [], "channels_last": []}
    for _ in range(args.rounds):  # interleaved, so contention hits both formats alike
        for name in times:
            torch.manual_seed(0)
            times[name] += bare_train_loop(build_model(), batch, args.steps,
                                           channels_last=name == "channels_last")
        peaks.append(matmul_peak())
    result["matmul_peak_gflops"] = [round(p, 1) for p in peaks]
    for name, ts in times.items():
        ips_median = args.batch / statistics.median(ts)
        result[f"{name}_img_per_s_median"] = round(ips_median, 3)
        result[f"{name}_img_per_s_best"] = round(args.batch / min(ts), 3)
        result[f"{name}_achieved_gflops_median"] = round(ips_median * 3 * fwd / 1e9, 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
