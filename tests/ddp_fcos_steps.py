"""A few SGD steps of a small FCOS on fixed data; run alone or under torchrun (test helper).

    python tests/ddp_fcos_steps.py OUT GLOBAL_BATCH STEPS
    torchrun --nproc_per_node 2 tests/ddp_fcos_steps.py OUT GLOBAL_BATCH STEPS

Each step takes the next ``GLOBAL_BATCH`` images of a fixed set (no augmentation); process ``r``
of ``N`` trains on its ``r``-th slice of ``GLOBAL_BATCH / N`` of them through DDP. Rank 0 writes
``OUT/w{N}.pt``: per step the global loss parts (the mean over processes of each process's
loss, which DDP's gradient averaging makes the loss actually minimised) and every parameter's
gradient, then the final parameters. BatchNorm layers are in eval mode: on CPU their batch
statistics are per process (no SyncBatchNorm), so 2 images would not normalise like 4.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from hatcore import distributed as dist
from hatcore.plugins import make_plugin_manager, set_plugins
from hatcore.recipe import ModelSpec, make_converter

MODEL = {"type": "fcos", "num_classes": 3,
         "backbone": {"type": "efficientnet", "model_type": "b0", "pretrained": ""},
         "neck": {"type": "bifpn", "out_strides": [8, 16, 32, 64], "out_channels": 16,
                  "stack": 1},
         "head": {"type": "fcos_head", "feat_channels": 16, "stacked_convs": 1}}


def fixed_data(n: int, size: int = 64) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """``n`` random images with 1-3 boxes each, the same on every process."""
    g = torch.Generator().manual_seed(123)
    imgs = torch.randn(n, 3, size, size, generator=g)
    boxes, labels = [], []
    for _ in range(n):
        k = int(torch.randint(1, 4, (1,), generator=g))
        xy = torch.rand(k, 2, generator=g) * size * 0.6
        wh = 8 + torch.rand(k, 2, generator=g) * size * 0.4
        boxes.append(torch.cat([xy, (xy + wh).clamp(max=size - 1)], 1))
        labels.append(torch.randint(0, 3, (k,), generator=g))
    return imgs, boxes, labels


def main() -> None:
    out, global_batch, steps = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    dist.init()
    n, r = dist.world_size(), dist.rank()
    local = global_batch // n
    plugins = make_plugin_manager(only={"hat-fcos"})
    set_plugins(plugins)
    torch.manual_seed(0)
    spec = make_converter(plugins.registry).structure(MODEL, ModelSpec)
    model = plugins.hook.build_model(spec=spec, plugins=plugins)
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    ddp = dist.wrap(model, torch.device("cpu"), sync_bn=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    imgs, boxes, labels = fixed_data(global_batch * steps)
    record: dict[str, list[torch.Tensor] | dict[str, torch.Tensor]] = {"losses": [], "grads": []}
    for s in range(steps):
        idx = list(range(s * global_batch + r * local, s * global_batch + (r + 1) * local))
        batch = {"img": imgs[idx], "gt_boxes": [boxes[i] for i in idx],
                 "gt_labels": [labels[i] for i in idx]}
        losses = model.compute_loss(ddp(batch["img"]), batch)
        opt.zero_grad()
        sum(losses.values()).backward()  # type: ignore[union-attr]
        parts = torch.stack([losses[k].detach() for k in sorted(losses)])
        record["losses"].append(dist.reduce_mean(parts))  # type: ignore[union-attr]
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in model.parameters()]
        record["grads"].append(torch.cat([g.reshape(-1) for g in grads]))  # type: ignore[union-attr]
        opt.step()
    record["params"] = {k: v.detach().clone() for k, v in model.named_parameters()}
    if dist.is_main():
        torch.save(record, out / f"w{n}.pt")


if __name__ == "__main__":
    main()
