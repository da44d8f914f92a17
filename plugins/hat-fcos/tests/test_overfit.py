"""A small FCOS overfits a few synthetic images to COCO AP >= 0.9 (pycocotools)."""

from __future__ import annotations

import torch
from helpers import build
from shapes import coco_ap, make_images


def test_tiny_fcos_overfits_synthetic_shapes(fcos_plugins) -> None:
    torch.manual_seed(0)
    model = build(fcos_plugins, num_classes=3, backbone={"pretrained": "efficientnet-lite0"},
                  neck={"stack": 1}, head={"stacked_convs": 2, "feat_channels": 32})
    batch = make_images(4, 128, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    model.train()
    for _ in range(160):
        losses = model.compute_loss(model(batch["img"]), batch)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        dets = model.postprocess(model(batch["img"]), batch)
    ap = coco_ap(batch, dets)
    assert ap >= 0.9, ap
