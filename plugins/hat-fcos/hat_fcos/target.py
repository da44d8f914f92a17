"""DynamicFcosTarget (SimOTA-like) and the FCOS losses, as Horizon HAT computes them.

Assignment, per image (``assign``), everything in units of each point's stride:

1. candidates of a GT: the points strictly inside its centre region, the GT box clipped to
   ``centre ± radius · stride`` (``center_sampling``; else the points inside the box);
2. ``iou[p, j]``: IoU of point p's predicted box with GT j (0 outside the candidates);
3. ``cost[p, j] = cls_cost_weight · Σ_c focal(logit[p, c], c == label_j)
   + reg_cost_weight · (1 - GIoU(pred_p, gt_j))`` (the seed's ``targets``: FocalLoss over all
   classes + ``loss_reg`` weight 2.0 × GIoU loss), ``+inf`` outside the candidates;
4. each GT takes its ``k_j = max(1, int(Σ of its topK IoUs))`` (truncated) cheapest points;
5. a point taken by several GTs goes to the GT with the lowest cost for it; matches outside the
   candidates are dropped (a GT may end with none).

Centerness target of a positive = ``iou[p, owner]``. The box (GIoU) loss of a positive is
weighted by the geometric FCOS centerness of its regression target
(:func:`centerness_target`) and averaged by the sum of those weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from hat_fcos.boxes import aligned_iou_giou

INF = 1e8


@dataclass
class Assignment:
    """Per image: ``gt_index (Tensor[P])`` (-1: background), ``ctr_target (Tensor[P])`` (IoU of
    the prediction with its GT) and ``box_target (Tensor[P, 4])`` (l, t, r, b in strides)."""

    gt_index: torch.Tensor
    ctr_target: torch.Tensor
    box_target: torch.Tensor


def centerness_target(ltrb: torch.Tensor) -> torch.Tensor:
    """FCOS centerness of regression targets ``Tensor[M, 4]`` (l, t, r, b):
    ``sqrt(min(l, r) / max(l, r) · min(t, b) / max(t, b))``."""
    lr, tb = ltrb[:, 0::2], ltrb[:, 1::2]
    ratio = (lr.min(1).values / lr.max(1).values.clamp(min=1e-12)) * \
        (tb.min(1).values / tb.max(1).values.clamp(min=1e-12))
    return ratio.clamp(min=0).sqrt()


def focal_terms(logits: torch.Tensor, alpha: float, gamma: float) -> tuple[torch.Tensor, ...]:
    """Element-wise sigmoid focal loss of ``logits`` against target 1 and against target 0."""
    p = logits.sigmoid()
    pos = alpha * (1 - p) ** gamma * F.softplus(-logits)  # -log(p)
    neg = (1 - alpha) * p ** gamma * F.softplus(logits)  # -log(1 - p)
    return pos, neg


def candidates(points: torch.Tensor, stride: torch.Tensor, gt_boxes: torch.Tensor,
               center_sampling: bool, radius: float) -> torch.Tensor:
    """``Tensor[P, N]`` bool: point p lies strictly inside GT j's (centre) region."""
    region = gt_boxes[None].expand(len(points), -1, -1)  # [P, N, 4]
    if center_sampling:
        centre = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2  # [N, 2]
        reach = (stride * radius)[:, None, None]  # [P, 1, 1]
        region = torch.cat([torch.maximum(centre - reach, region[..., :2]),
                            torch.minimum(centre + reach, region[..., 2:])], -1)
    x, y = points[:, None, 0], points[:, None, 1]
    gap = torch.stack([x - region[..., 0], y - region[..., 1], region[..., 2] - x,
                       region[..., 3] - y], -1)
    return gap.min(-1).values > 0


@torch.no_grad()
def assign(points: torch.Tensor, stride: torch.Tensor, pred_dist: torch.Tensor,
           cls_logits: torch.Tensor, gt_boxes: torch.Tensor, gt_labels: torch.Tensor,
           topk: int = 10, center_sampling: bool = True, radius: float = 2.5,
           cls_cost_weight: float = 1.0, reg_cost_weight: float = 2.0,
           alpha: float = 0.25, gamma: float = 2.0) -> Assignment:
    """Assign the points of one image to its GTs (module docstring).

    :param points: ``Tensor[P, 2]`` (x, y) input pixels.
    :param stride: ``Tensor[P]`` each point's stride.
    :param pred_dist: ``Tensor[P, 4]`` predicted (l, t, r, b) in units of stride.
    :param cls_logits: ``Tensor[P, C]``.
    :param gt_boxes: ``Tensor[N, 4]`` xyxy input pixels.
    :param gt_labels: ``Tensor[N]`` int64.
    """
    p, n = len(points), len(gt_boxes)
    dev = points.device
    gt_index = torch.full((p,), -1, dtype=torch.long, device=dev)
    ctr = torch.zeros(p, dtype=pred_dist.dtype, device=dev)
    box_t = torch.zeros(p, 4, dtype=pred_dist.dtype, device=dev)
    if n == 0:
        return Assignment(gt_index, ctr, box_t)
    cand = candidates(points, stride, gt_boxes, center_sampling, radius)  # [P, N]
    s = stride[:, None, None]
    target = torch.cat([points[:, None] - gt_boxes[None, :, :2],
                        gt_boxes[None, :, 2:] - points[:, None]], -1) / s  # [P, N, 4] strides
    # the boxes both distances span around the point, in stride units
    pred_box = torch.cat([-pred_dist[:, :2], pred_dist[:, 2:]], -1)[:, None]  # [P, 1, 4]
    gt_box = torch.cat([-target[..., :2], target[..., 2:]], -1)  # [P, N, 4]
    iou, giou = aligned_iou_giou(pred_box, gt_box)  # [P, N]
    iou = torch.where(cand, iou, torch.zeros_like(iou))
    pos, neg = focal_terms(cls_logits.float(), alpha, gamma)  # [P, C]
    cls_cost = neg.sum(1, keepdim=True) - neg[:, gt_labels] + pos[:, gt_labels]  # [P, N]
    cost = cls_cost_weight * cls_cost + reg_cost_weight * (1 - giou)
    cost = torch.where(cand, cost, torch.full_like(cost, INF))
    k_max = min(topk, p)
    k = iou.topk(k_max, 0).values.sum(0).int().clamp(min=1)  # [N], truncated
    cheapest = cost.topk(k_max, 0, largest=False).indices  # [k_max, N]
    match = torch.zeros(p, n, dtype=torch.bool, device=dev)
    match[cheapest, torch.arange(n, device=dev).expand(k_max, n)] = \
        torch.arange(k_max, device=dev)[:, None] < k[None]
    multi = match.sum(1) > 1
    if bool(multi.any()):  # a point taken twice goes to its cheapest GT (among all GTs)
        cheapest = cost[multi].argmin(1)
        match[multi] = F.one_hot(cheapest, n).bool()
    match &= cand
    claimed = match.any(1)
    owner = match.float().argmax(1)
    gt_index[claimed] = owner[claimed]
    rows = torch.nonzero(claimed).flatten()
    ctr[rows] = iou[rows, owner[rows]].to(ctr.dtype)
    box_t[rows] = target[rows, owner[rows]].to(box_t.dtype)
    return Assignment(gt_index, ctr, box_t)


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25,
               gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss, summed. ``logits``, ``targets``: ``Tensor[P, C]`` (targets 0/1)."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    a_t = alpha * targets + (1 - alpha) * (1 - targets)
    return (a_t * (1 - p_t) ** gamma * ce).sum()


def giou_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
              denominator: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted mean of ``1 - GIoU`` over paired boxes ``Tensor[M, 4]``; weight ``Tensor[M]``.

    :param denominator: divides the weighted sum instead of ``weight.sum()`` (the model passes
        the weights' sum over all processes, scaled to one process's share).
    """
    _, giou = aligned_iou_giou(pred, target)
    if denominator is None:
        denominator = weight.sum().clamp(min=1e-6)
    return ((1 - giou) * weight).sum() / denominator
