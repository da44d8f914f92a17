"""The FCOS task model: backbone -> neck -> head between a QuantStub and DeQuantStubs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hat_fcos.boxes import distance_to_box, level_points
from hat_fcos.decoder import FCOSDecoder, decode_distances, flatten_levels
from hat_fcos.target import assign, centerness_target, focal_loss, giou_loss
from hatcore.errors import UserError
from hatcore.quant import QuantStub


class FCOS(nn.Module):
    """FCOS detector following :mod:`hatcore.data`'s task-model contract.

    ``forward(img: Tensor[B,3,H,W]) -> (cls, bbox, centerness)``, each a list over levels of
    ``Tensor[B, C|4|1, H_l, W_l]`` (raw conv outputs: the deployable graph).

    :param backbone: returns the features at ``in_strides``.
    :param neck: maps them to one feature per level in ``strides``.
    :param head: shared per-level head (an :class:`~hat_fcos.head.FCOSHead`).
    :param strides: stride of each head level.
    :param num_classes: object classes.
    :param decoder: turns raw outputs into detections.
    """

    def __init__(self, backbone: nn.Module, neck: nn.Module, head: nn.Module, strides: list[int],
                 num_classes: int, decoder: FCOSDecoder, upscale_bbox_pred: bool = True,
                 topk: int = 10, cls_cost_weight: float = 1.0, reg_cost_weight: float = 3.0,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0, cls_weight: float = 1.0,
                 giou_weight: float = 2.0, centerness_weight: float = 1.0) -> None:
        super().__init__()
        self.quant = QuantStub(scale=1 / 128)
        self.backbone, self.neck, self.head = backbone, neck, head
        self.strides, self.num_classes = strides, num_classes
        self.decoder = decoder
        self.upscale = upscale_bbox_pred
        self.topk, self.cost_w = topk, (cls_cost_weight, reg_cost_weight)
        self.alpha, self.gamma = focal_alpha, focal_gamma
        self.loss_w = (cls_weight, giou_weight, centerness_weight)

    def forward(self, img: torch.Tensor) -> tuple[list[torch.Tensor], ...]:
        return self.head(self.neck(self.backbone(self.quant(img))))

    def compute_loss(self, raw: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Focal (cls), GIoU weighted by the target's geometric centerness (bbox), BCE (centerness)."""
        cls_l, bbox_l, ctr_l = raw
        self._check_labels(batch)
        sizes = [tuple(c.shape[-2:]) for c in cls_l]
        points, stride = level_points(sizes, self.strides, cls_l[0].device)
        cls = flatten_levels(cls_l).float()  # [B, P, C]
        ctr = flatten_levels(ctr_l).float()[..., 0]  # [B, P]
        boxes = distance_to_box(points, decode_distances(flatten_levels(bbox_l).float(), stride,
                                                         self.upscale))  # [B, P, 4]
        cls_t = torch.zeros_like(cls)
        pos_pred, pos_gt, pos_w, pos_ctr, pos_iou = [], [], [], [], []
        for i in range(len(cls)):
            gtb = batch["gt_boxes"][i].to(cls.device, torch.float32)
            gtl = batch["gt_labels"][i].to(cls.device)
            a = assign(points, boxes[i].detach(), cls[i].detach(), gtb, gtl, self.topk,
                       *self.cost_w)
            pos = a.gt_index >= 0
            cls_t[i, pos, gtl[a.gt_index[pos]]] = 1.0
            gt = gtb[a.gt_index[pos]]
            ltrb = torch.cat([points[pos] - gt[:, :2], gt[:, 2:] - points[pos]], 1)
            pos_pred.append(boxes[i, pos])
            pos_gt.append(gt)
            pos_w.append(centerness_target(ltrb.clamp(min=0)))
            pos_ctr.append(ctr[i, pos])
            pos_iou.append(a.ctr_target[pos])
        num_pos = max(sum(len(p) for p in pos_w), 1)
        w = torch.cat(pos_w)
        c = torch.cat(pos_ctr)
        loss_cls = focal_loss(cls, cls_t, self.alpha, self.gamma) / num_pos
        loss_bbox = giou_loss(torch.cat(pos_pred), torch.cat(pos_gt), w) if len(w) else \
            boxes.sum() * 0
        loss_ctr = nn.functional.binary_cross_entropy_with_logits(
            c, torch.cat(pos_iou), reduction="sum") / num_pos
        cw, bw, tw = self.loss_w
        return {"loss_cls": cw * loss_cls, "loss_bbox": bw * loss_bbox,
                "loss_centerness": tw * loss_ctr}

    def _check_labels(self, batch: dict[str, Any]) -> None:
        labels = [lb for lb in batch["gt_labels"] if len(lb)]
        if not labels:
            return
        top = int(torch.cat(labels).max())
        if top >= self.num_classes or int(torch.cat(labels).min()) < 0:
            bad = next(i for i, lb in enumerate(batch["gt_labels"])
                       if len(lb) and (int(lb.max()) >= self.num_classes or int(lb.min()) < 0))
            image_id = (batch.get("meta") or [{}] * (bad + 1))[bad].get("image_id", bad)
            raise UserError(f"[model] num_classes = {self.num_classes}, but image {image_id} "
                            f"has labels {batch['gt_labels'][bad].tolist()}; set num_classes "
                            f"to the dataset's number of classes")

    @torch.no_grad()
    def postprocess(self, raw: Any, batch: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        """Detections per image in original-image pixels (see :class:`FCOSDecoder`)."""
        return self.decoder(raw, batch)
