"""Optimizers with per-parameter-group weight decay, LR schedules and the EMA of weights."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from hatcore.errors import UserError
from hatcore.recipe import Optimizer, Schedule

NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
               nn.modules.instancenorm._InstanceNorm)


def param_groups(model: nn.Module, cfg: Optimizer) -> list[dict[str, object]]:
    """Split trainable parameters: conv/linear weights, norm-layer parameters, biases.

    Each group has its own weight decay (``weight_decay``, ``norm_weight_decay``,
    ``bias_weight_decay``), as HAT's ``params={"weight": ...}`` rules do.
    """
    groups: dict[str, list[nn.Parameter]] = {"weight": [], "norm": [], "bias": []}
    seen: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(module, NORM_LAYERS):
                groups["norm"].append(p)
            elif name.endswith("bias") or p.ndim <= 1:
                groups["bias"].append(p)
            else:
                groups["weight"].append(p)
    decay = {"weight": cfg.weight_decay, "norm": cfg.norm_weight_decay, "bias": cfg.bias_weight_decay}
    return [{"params": ps, "weight_decay": decay[k], "name": k} for k, ps in groups.items() if ps]


def build_optimizer(model: nn.Module, cfg: Optimizer) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov) or AdamW over :func:`param_groups`.

    ``cfg.lr`` is the learning rate of the whole batch: with DDP the gradients are averaged
    over processes. The trainer sets every step's lr from :func:`scaled_lr` (the global batch
    vs ``base_batch_size``) and the schedule.
    """
    groups = param_groups(model, cfg)
    if cfg.type == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]))


def scaled_lr(cfg: Optimizer, global_batch: int) -> tuple[float, str]:
    """The lr a stage trains with at ``global_batch`` images per step, and why.

    ``cfg.base_batch_size`` unset: ``cfg.lr`` as given. Else ``cfg.lr`` times ``batch / base``
    (``linear``, MMDetection's ``auto_scale_lr``), ``sqrt(batch / base)`` (``sqrt``) or 1
    (``none``).
    """
    if cfg.base_batch_size is None:
        return cfg.lr, (f"lr {cfg.lr:g} as given (no base_batch_size: not scaled to the global "
                        f"batch of {global_batch})")
    if cfg.base_batch_size < 1:
        raise UserError(f"optimizer.base_batch_size = {cfg.base_batch_size}: expected the "
                        "positive global batch the lr was tuned for")
    ratio = global_batch / cfg.base_batch_size
    factor = {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[cfg.lr_scaling]
    lr = cfg.lr * factor
    rule = {"linear": f"x {global_batch}/{cfg.base_batch_size}",
            "sqrt": f"x sqrt({global_batch}/{cfg.base_batch_size})", "none": "unscaled"}
    return lr, (f"lr {lr:.4g} = {cfg.lr:g} {rule[cfg.lr_scaling]} (lr_scaling = "
                f"{cfg.lr_scaling!r}: global batch {global_batch}, base_batch_size "
                f"{cfg.base_batch_size})")


def warmup_iters(cfg: Schedule, iters_per_epoch: int, total: int) -> int:
    """Warmup length in iterations: ``warmup_iters`` if > 0, else ``warmup_epochs`` x
    iterations per epoch; a warmup asked for lasts at least ``min_warmup_iters``, capped at the
    stage's ``total`` iterations."""
    asked = cfg.warmup_iters or int(round(cfg.warmup_epochs * iters_per_epoch))
    if asked <= 0:
        return 0
    return min(max(asked, cfg.min_warmup_iters), max(total, 1))


class LRSchedule:
    """The learning-rate factor at every global iteration (warmup, then cosine/step/constant)."""

    def __init__(self, cfg: Schedule, iters_per_epoch: int, epochs: int) -> None:
        self.cfg = cfg
        self.ipe = max(1, iters_per_epoch)
        self.total = self.ipe * epochs
        self.warmup = warmup_iters(cfg, self.ipe, self.total)

    def factor(self, step: int) -> float:
        """LR multiplier at global iteration ``step`` (0-based)."""
        cfg = self.cfg
        if cfg.by == "epoch":
            step = (step // self.ipe) * self.ipe  # constant within an epoch
        if step < self.warmup:
            return cfg.warmup_start_factor + (1 - cfg.warmup_start_factor) * step / self.warmup
        if cfg.type == "cosine":
            span = max(1, self.total - self.warmup)
            progress = min(1.0, (step - self.warmup) / span)
            return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        if cfg.type == "step":
            epoch = step // self.ipe
            return float(cfg.gamma ** sum(1 for m in cfg.milestones if epoch >= m))
        return 1.0

    def apply(self, optimizer: torch.optim.Optimizer, base_lr: float, step: int) -> float:
        """Set every group's lr to ``base_lr * factor(step)``; return it."""
        lr = base_lr * self.factor(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr


def build_scheduler(cfg: Schedule, iters_per_epoch: int, epochs: int) -> LRSchedule:
    """The learning-rate schedule of a stage of ``epochs`` epochs of ``iters_per_epoch`` iters."""
    return LRSchedule(cfg, iters_per_epoch, epochs)


class ModelEMA:
    """Exponential moving average of a model's weights (HAT/YOLOv5 style).

    decay at update ``n`` = ``decay * (1 - exp(-n / tau))``: small at first so the average
    follows the fast-moving early weights, approaching ``decay`` later. Float tensors are
    averaged; integer buffers (BN's ``num_batches_tracked``) are copied.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000.0) -> None:
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.tau = decay, tau
        self.updates = 0

    def current_decay(self) -> float:
        return self.decay * (1 - math.exp(-self.updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.current_decay()
        src = model.state_dict()
        for k, v in self.module.state_dict().items():
            s = src[k].detach()
            if v.dtype.is_floating_point:
                v.mul_(d).add_(s.to(v.dtype), alpha=1 - d)
            else:
                v.copy_(s)

    def state_dict(self) -> dict[str, object]:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.module.load_state_dict(state["module"])  # type: ignore[arg-type]
        self.updates = int(state["updates"])  # type: ignore[call-overload]
