"""DynamicFcosTarget (SimOTA-like) and the FCOS losses.

Assignment, per image: candidates are the points inside a GT box (a GT with none gets its
nearest point). cost = cls_w * BCE(logit of the GT class, 1) + reg_w * (1 - GIoU(pred, GT)),
outside candidates +inf. Each GT takes ``k = max(1, round(sum of its topK IoUs))`` cheapest
candidates; a point claimed by several GTs goes to the cheapest. Centerness target = IoU of the
predicted box with its GT. The box loss is weighted by the geometric FCOS centerness of the
regression target (:func:`centerness_target`), as HAT's ``_centerness_target``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from hat_fcos.boxes import aligned_iou_giou

INF = 1e8


@dataclass
class Assignment:
    """Per image: ``gt_index (Tensor[P])`` (-1: background) and ``ctr_target (Tensor[P])``."""

    gt_index: torch.Tensor
    ctr_target: torch.Tensor


@torch.no_grad()
def assign(points: torch.Tensor, pred_boxes: torch.Tensor, cls_logits: torch.Tensor,
           gt_boxes: torch.Tensor, gt_labels: torch.Tensor, topk: int = 10,
           cls_weight: float = 1.0, reg_weight: float = 3.0) -> Assignment:
    """Assign points of one image to GTs.

    :param points: ``Tensor[P, 2]`` (x, y).
    :param pred_boxes: ``Tensor[P, 4]`` decoded predictions, xyxy.
    :param cls_logits: ``Tensor[P, C]``.
    :param gt_boxes: ``Tensor[N, 4]`` xyxy.
    :param gt_labels: ``Tensor[N]`` int64.
    """
    p, n = len(points), len(gt_boxes)
    gt_index = torch.full((p,), -1, dtype=torch.long, device=points.device)
    ctr = torch.zeros(p, dtype=pred_boxes.dtype, device=points.device)
    if n == 0:
        return Assignment(gt_index, ctr)
    x, y = points[:, 0:1], points[:, 1:2]  # [P, 1]
    inside = (x > gt_boxes[:, 0]) & (x < gt_boxes[:, 2]) & (y > gt_boxes[:, 1]) & \
        (y < gt_boxes[:, 3])  # [P, N]
    centres = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    nearest = torch.cdist(points, centres).argmin(0)  # [N]
    inside[nearest, torch.arange(n, device=points.device)] |= ~inside.any(0)
    iou, giou = aligned_iou_giou(pred_boxes[:, None], gt_boxes[None])  # [P, N]
    cls_cost = F.binary_cross_entropy_with_logits(
        cls_logits[:, gt_labels].float(), torch.ones(p, n, device=points.device), reduction="none")
    cost = cls_weight * cls_cost + reg_weight * (1 - giou) + INF * (~inside)
    iou = iou * inside
    k_max = min(topk, p)
    k = iou.topk(k_max, 0).values.sum(0).round().clamp(min=1, max=k_max).long()  # [N]
    cheapest = cost.topk(k_max, 0, largest=False).indices  # [k_max, N]
    rank_ok = torch.arange(k_max, device=points.device)[:, None] < k[None]
    match = torch.zeros(p, n, dtype=torch.bool, device=points.device)
    match[cheapest, torch.arange(n, device=points.device).expand(k_max, n)] = rank_ok
    match &= inside
    masked = torch.where(match, cost, torch.full_like(cost, float("inf")))
    claimed = match.any(1)
    owner = masked.argmin(1)
    # a GT left without a point (all its points won by others) takes its cheapest free point
    won = torch.zeros(n, dtype=torch.bool, device=points.device)
    won[owner[claimed]] = True
    for j in torch.nonzero(~won).flatten().tolist():
        free = torch.where(claimed, torch.full_like(cost[:, j], float("inf")), cost[:, j])
        i = int(free.argmin()) if bool(torch.isfinite(free).any()) else int(cost[:, j].argmin())
        claimed[i], owner[i] = True, j
    gt_index[claimed] = owner[claimed]
    ctr[claimed] = iou[claimed, owner[claimed]].clamp(min=0).to(ctr.dtype)
    return Assignment(gt_index, ctr)


def centerness_target(ltrb: torch.Tensor) -> torch.Tensor:
    """FCOS centerness of regression targets ``Tensor[M, 4]`` (l, t, r, b):
    ``sqrt(min(l, r) / max(l, r) · min(t, b) / max(t, b))``."""
    lr, tb = ltrb[:, 0::2], ltrb[:, 1::2]
    ratio = (lr.min(1).values / lr.max(1).values.clamp(min=1e-12)) * \
        (tb.min(1).values / tb.max(1).values.clamp(min=1e-12))
    return ratio.clamp(min=0).sqrt()


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25,
               gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss, summed. ``logits``, ``targets``: ``Tensor[P, C]`` (targets 0/1)."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    a_t = alpha * targets + (1 - alpha) * (1 - targets)
    return (a_t * (1 - p_t) ** gamma * ce).sum()


def giou_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted mean of ``1 - GIoU`` over paired boxes ``Tensor[M, 4]``; weight ``Tensor[M]``."""
    _, giou = aligned_iou_giou(pred, target)
    return ((1 - giou) * weight).sum() / weight.sum().clamp(min=1e-6)
