"""The FCOS task model: backbone -> neck -> head between a QuantStub and DeQuantStubs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from hat_fcos.boxes import level_points
from hat_fcos.decoder import FCOSDecoder, flatten_levels
from hat_fcos.target import assign, centerness_target, focal_loss, giou_loss
from hatcore.distributed import reduce_mean, world_size
from hatcore.errors import UserError
from hatcore.quant import QuantStub


def around_origin(ltrb: torch.Tensor) -> torch.Tensor:
    """Distances ``Tensor[M, 4]`` (l, t, r, b) -> the box they span around (0, 0), xyxy."""
    return torch.cat([-ltrb[:, :2], ltrb[:, 2:]], 1)


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
                 topk: int = 10, center_sampling: bool = True, center_sampling_radius: float = 2.5,
                 cls_cost_weight: float = 1.0, reg_cost_weight: float = 2.0,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0, cls_weight: float = 1.0,
                 giou_weight: float = 2.0, centerness_weight: float = 1.0) -> None:
        super().__init__()
        self.quant = QuantStub(scale=1 / 128)
        self.backbone, self.neck, self.head = backbone, neck, head
        self.strides, self.num_classes = strides, num_classes
        self.decoder = decoder
        self.upscale = upscale_bbox_pred
        self.topk, self.cost_w = topk, (cls_cost_weight, reg_cost_weight)
        self.sampling = (center_sampling, center_sampling_radius)
        self.alpha, self.gamma = focal_alpha, focal_gamma
        self.loss_w = (cls_weight, giou_weight, centerness_weight)

    def forward(self, img: torch.Tensor) -> tuple[list[torch.Tensor], ...]:
        return self.head(self.neck(self.backbone(self.quant(img))))

    def compute_loss(self, raw: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Focal loss over positives (cls), GIoU weighted by the geometric centerness of the
        target and averaged by the weights' sum (bbox), BCE towards the IoU (centerness); targets
        from :func:`~hat_fcos.target.assign`, in units of stride. The number of positives and
        the weights' sum are those of the global batch (averaged over processes)."""
        cls_l, bbox_l, ctr_l = raw
        self._check_labels(batch)
        sizes = [tuple(c.shape[-2:]) for c in cls_l]
        points, stride = level_points(sizes, self.strides, cls_l[0].device)
        cls = flatten_levels(cls_l).float()  # [B, P, C]
        ctr = flatten_levels(ctr_l).float()[..., 0]  # [B, P]
        dist = F.relu(flatten_levels(bbox_l).float())  # [B, P, 4] (l, t, r, b)
        if not self.upscale:  # predicted in pixels: to units of stride
            dist = dist / stride[:, None]
        cls_t = torch.zeros_like(cls)
        pos_pred, pos_box, pos_iou, pos_ctr = [], [], [], []
        for i in range(len(cls)):
            gtb = batch["gt_boxes"][i].to(cls.device, torch.float32)
            gtl = batch["gt_labels"][i].to(cls.device)
            a = assign(points, stride, dist[i].detach(), cls[i].detach(), gtb, gtl, self.topk,
                       *self.sampling, *self.cost_w, self.alpha, self.gamma)
            pos = a.gt_index >= 0
            cls_t[i, pos, gtl[a.gt_index[pos]]] = 1.0
            pos_pred.append(dist[i, pos])
            pos_box.append(a.box_target[pos])
            pos_iou.append(a.ctr_target[pos])
            pos_ctr.append(ctr[i, pos])
        pred, target = torch.cat(pos_pred), torch.cat(pos_box)
        # normalisers of the whole global batch (MMDetection's reduce_mean): with DDP averaging
        # gradients, N processes of batch B then train exactly like one process of batch N x B
        n = world_size()
        num_pos = reduce_mean(cls.new_tensor(float(len(pred)))).clamp(min=1 / n)
        weight = centerness_target(target)
        weight_sum = reduce_mean(weight.sum()).clamp(min=1e-6 / n)
        loss_cls = focal_loss(cls, cls_t, self.alpha, self.gamma) / num_pos
        loss_bbox = giou_loss(around_origin(pred), around_origin(target), weight,
                              weight_sum) if len(pred) else dist.sum() * 0
        loss_ctr = F.binary_cross_entropy_with_logits(torch.cat(pos_ctr), torch.cat(pos_iou),
                                                      reduction="sum") / num_pos
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

    @property
    def score_threshold(self) -> float:
        """The decoder's ``score_thr`` (hatcore.protocols.score_threshold): no detection scores
        at or below it."""
        return float(self.decoder.score_thr)

    @torch.no_grad()
    def postprocess(self, raw: Any, batch: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        """Detections per image in original-image pixels (see :class:`FCOSDecoder`)."""
        return self.decoder(raw, batch)
