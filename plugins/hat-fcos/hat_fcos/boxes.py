"""Box helpers in pure torch (no torchvision): points, distance decoding, IoU/GIoU, NMS."""

from __future__ import annotations

import numpy as np
import torch


def level_points(sizes: list[tuple[int, int]], strides: list[int], device: torch.device,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Centres of every feature-map cell of every level, finest first.

    :returns: ``points (Tensor[P, 2])`` as (x, y) input pixels and ``stride (Tensor[P])``.
    """
    pts, strd = [], []
    for (h, w), s in zip(sizes, strides, strict=True):
        ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) * s
        xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) * s
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        pts.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], 1))
        strd.append(torch.full((h * w,), float(s), device=device, dtype=dtype))
    return torch.cat(pts), torch.cat(strd)


def distance_to_box(points: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    """``points (Tensor[..., 2])`` and ``dist (Tensor[..., 4])`` (l, t, r, b) -> xyxy."""
    return torch.cat([points - dist[..., :2], points + dist[..., 2:]], -1)


def area(b: torch.Tensor) -> torch.Tensor:
    return (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)


def aligned_iou_giou(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU and GIoU of paired boxes ``Tensor[..., 4]`` xyxy (broadcasting)."""
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area(a) + area(b) - inter
    iou = inter / union.clamp(min=1e-6)
    elt = torch.minimum(a[..., :2], b[..., :2])
    erb = torch.maximum(a[..., 2:], b[..., 2:])
    enclose = (erb - elt).clamp(min=0).prod(-1).clamp(min=1e-6)
    return iou, iou - (enclose - union) / enclose


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU: ``Tensor[N, 4]``, ``Tensor[M, 4]`` -> ``Tensor[N, M]``."""
    return aligned_iou_giou(a[:, None], b[None])[0]


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_thr: float,
        labels: torch.Tensor | None = None, max_keep: int | None = None) -> torch.Tensor:
    """Greedy (multiclass when ``labels`` is given) NMS; returns kept indices, best first.

    The IoU matrix is computed once on the boxes' device; the greedy sweep runs over a boolean
    matrix on the CPU and stops as soon as ``max_keep`` boxes are kept.

    :param boxes: ``Tensor[N, 4]`` xyxy.
    :param scores: ``Tensor[N]``.
    :param labels: ``Tensor[N]``: boxes of different labels never suppress each other.
    """
    order = scores.argsort(descending=True)
    if len(order) == 0:
        return order
    b = boxes[order]
    over = box_iou(b, b) > iou_thr  # [N, N]
    if labels is not None:
        lab = labels[order]
        over &= lab[:, None] == lab[None]
    over_np = over.cpu().numpy()
    n = len(b)
    limit = n if max_keep is None else max_keep
    removed = np.zeros(n, dtype=bool)
    keep = []
    for i in range(n):
        if removed[i]:
            continue
        keep.append(i)
        if len(keep) >= limit:
            break
        removed |= over_np[i]
    return order[torch.as_tensor(keep, dtype=torch.long, device=order.device)]
