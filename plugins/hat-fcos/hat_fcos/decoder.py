"""FCOSDecoder: raw head outputs -> detections in original-image pixels, multiclass NMS."""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from hat_fcos.boxes import distance_to_box, level_points, nms


def flatten_levels(outs: list[torch.Tensor]) -> torch.Tensor:
    """Per-level ``Tensor[B, K, H, W]`` -> ``Tensor[B, P, K]`` (levels concatenated)."""
    return torch.cat([o.flatten(2) for o in outs], 2).transpose(1, 2)


def decode_distances(bbox: torch.Tensor, stride: torch.Tensor, upscale: bool) -> torch.Tensor:
    """Raw box outputs ``Tensor[..., P, 4]`` -> (l, t, r, b) pixels: relu, times stride."""
    dist = F.relu(bbox)
    return dist * stride[:, None] if upscale else dist


class FCOSDecoder:
    """HAT's FCOSDecoder. Per level, the top ``nms_pre`` points by their best class score (times
    centerness when ``nms_use_centerness``); the (point, class) pairs whose **class score**
    passes ``score_thr``; each scored ``sqrt(score x centerness)`` (``nms_sqrt``; without the
    root otherwise; the class score alone without ``nms_use_centerness``), which ranks the
    multiclass greedy NMS and is the detection's score; distance -> box clipped to the resized
    image, divided by ``meta["scale"]`` (sy, sx) and clipped to ``meta["orig_size"]``;
    ``max_per_img`` kept. ``__call__(raw, batch)`` returns one ``{"boxes" Tensor[N, 4] xyxy,
    "scores" Tensor[N], "labels" Tensor[N]}`` per image.

    :param strides: stride of each level.
    :param upscale_bbox_pred: box outputs are in units of stride.
    """

    def __init__(self, strides: list[int], upscale_bbox_pred: bool = True,
                 score_thr: float = 0.05, nms_pre: int = 1000, nms_iou: float = 0.6,
                 max_per_img: int = 100, nms_use_centerness: bool = True,
                 nms_sqrt: bool = True) -> None:
        self.strides = strides
        self.upscale = upscale_bbox_pred
        self.score_thr, self.nms_pre, self.nms_iou = score_thr, nms_pre, nms_iou
        self.max_per_img = max_per_img
        self.use_ctr, self.sqrt = nms_use_centerness, nms_sqrt

    def __call__(self, raw: Any, batch: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        cls, bbox, ctr = raw
        sizes = [tuple(c.shape[-2:]) for c in cls]
        points, stride = level_points(sizes, self.strides, cls[0].device)
        level = torch.cat([torch.full((h * w,), i, device=points.device)
                           for i, (h, w) in enumerate(sizes)])
        scores = flatten_levels(cls).float().sigmoid()  # [B, P, C]
        factor = flatten_levels(ctr).float().sigmoid() if self.use_ctr else \
            torch.ones_like(scores[..., :1])  # [B, P, 1]
        dist = decode_distances(flatten_levels(bbox).float(), stride, self.upscale)
        boxes = distance_to_box(points, dist)  # [B, P, 4]
        metas = batch.get("meta") or [{} for _ in range(len(boxes))]
        return [self._one(scores[i], factor[i, :, 0], boxes[i], level, metas[i],
                          batch["img"].shape[-2:]) for i in range(len(boxes))]

    def _one(self, scores: torch.Tensor, factor: torch.Tensor, boxes: torch.Tensor,
             level: torch.Tensor, meta: dict[str, Any], in_hw: tuple[int, int]
             ) -> dict[str, torch.Tensor]:
        best = scores.amax(1) * factor
        keep = []
        for lv in range(len(self.strides)):  # top nms_pre points per level
            idx = torch.nonzero(level == lv).flatten()
            if len(idx) > self.nms_pre:
                idx = idx[best[idx].topk(self.nms_pre).indices]
            keep.append(idx)
        idx = torch.cat(keep)
        pi, ci = torch.nonzero(scores[idx] > self.score_thr, as_tuple=True)  # the class score
        pi = idx[pi]
        sc = scores[pi, ci] * factor[pi]
        if self.sqrt and self.use_ctr:
            sc = sc.sqrt()
        bx = boxes[pi]
        h, w = meta.get("img_shape", in_hw)
        bx = torch.stack([bx[:, 0].clamp(0, w), bx[:, 1].clamp(0, h), bx[:, 2].clamp(0, w),
                          bx[:, 3].clamp(0, h)], 1)
        kept = nms(bx, sc, self.nms_iou, ci, self.max_per_img)
        bx, sc, ci = bx[kept], sc[kept], ci[kept]
        sy, sx = meta.get("scale", (1.0, 1.0))
        bx = bx / torch.tensor([sx, sy, sx, sy], dtype=bx.dtype, device=bx.device)
        if "orig_size" in meta:
            oh, ow = meta["orig_size"]
            bx = torch.stack([bx[:, 0].clamp(0, ow), bx[:, 1].clamp(0, oh),
                              bx[:, 2].clamp(0, ow), bx[:, 3].clamp(0, oh)], 1)
        return {"boxes": bx, "scores": sc, "labels": ci.long()}
