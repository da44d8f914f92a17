"""Losses against hand-computed values, NMS against brute force, assignment invariants."""

from __future__ import annotations

import math

import torch
from hat_fcos.boxes import box_iou, level_points, nms
from hat_fcos.decoder import FCOSDecoder
from hat_fcos.target import assign, candidates, focal_loss, giou_loss
from helpers import build


def test_focal_loss_matches_the_formula() -> None:
    logits = torch.tensor([[0.0, 2.0]])
    targets = torch.tensor([[1.0, 0.0]])
    # positive, p = 0.5: 0.25 * 0.5^2 * ln 2; negative, p = sigmoid(2): 0.75 * p^2 * -ln(1 - p)
    p = 1 / (1 + math.exp(-2.0))
    expected = 0.25 * 0.25 * math.log(2) + 0.75 * p**2 * -math.log(1 - p)
    assert math.isclose(float(focal_loss(logits, targets)), expected, rel_tol=1e-5)


def test_giou_loss_matches_a_hand_computed_pair() -> None:
    pred = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    gt = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 1.0, 1.0]])
    # pair 0: inter 1, union 7, enclosing 9 -> GIoU = 1/7 - 2/9; pair 1: identical -> 0 loss
    loss0 = 1 - (1 / 7 - 2 / 9)
    weight = torch.tensor([0.5, 1.5])
    expected = (0.5 * loss0 + 1.5 * 0.0) / 2.0
    assert math.isclose(float(giou_loss(pred, gt, weight)), expected, rel_tol=1e-5)


def brute_force_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
                    thr: float) -> list[int]:
    order = sorted(range(len(boxes)), key=lambda i: -float(scores[i]))
    keep: list[int] = []
    for i in order:
        if all(int(labels[i]) != int(labels[k]) or
               float(box_iou(boxes[i:i + 1], boxes[k:k + 1])) <= thr for k in keep):
            keep.append(i)
    return keep


def test_nms_equals_brute_force_greedy_nms() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        xy = torch.rand(120, 2, generator=g) * 100
        wh = torch.rand(120, 2, generator=g) * 40 + 5
        boxes = torch.cat([xy, xy + wh], 1)
        scores = torch.rand(120, generator=g)
        labels = torch.randint(0, 3, (120,), generator=g)
        got = nms(boxes, scores, 0.5, labels).tolist()
        assert got == brute_force_nms(boxes, scores, labels, 0.5)
        assert nms(boxes, scores, 0.5, labels, max_keep=7).tolist() == got[:7]


def test_assignment_invariants_on_random_scenes() -> None:
    g = torch.Generator().manual_seed(1)
    sizes, strides = [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)], [8, 16, 32, 64, 128]
    points, stride = level_points(sizes, strides, torch.device("cpu"))
    for trial in range(10):
        n = 1 + trial
        xy = torch.rand(n, 2, generator=g) * 100
        wh = torch.rand(n, 2, generator=g) * 60 + 2  # some boxes smaller than a stride
        gt = torch.cat([xy, xy + wh], 1)
        labels = torch.randint(0, 3, (n,), generator=g)
        dist = torch.rand(len(points), 4, generator=g) * 3  # in strides
        a = assign(points, stride, dist, torch.randn(len(points), 3, generator=g), gt, labels, 10)
        pos = a.gt_index >= 0
        counts = torch.bincount(a.gt_index[pos], minlength=n)
        assert (counts <= 10).all()  # k <= topK
        cand = candidates(points, stride, gt, True, 2.5)
        assert cand[pos, a.gt_index[pos]].all()  # positives lie in their GT's centre region
        assert ((a.ctr_target[pos] >= 0) & (a.ctr_target[pos] <= 1)).all()
        assert (a.ctr_target[~pos] == 0).all()
        assert (a.box_target[pos] > 0).all()  # inside the box: every distance positive


def test_decoder_maps_boxes_back_to_the_original_image() -> None:
    dec = FCOSDecoder([8], nms_use_centerness=False)
    cls = torch.full((1, 2, 4, 4), -10.0)
    cls[0, 1, 1, 2] = 5.0  # one confident point: centre (20, 12)
    bbox = torch.zeros(1, 4, 4, 4)
    bbox[0, :, 1, 2] = torch.tensor([1.0, 1.0, 2.0, 0.5])  # distances in strides
    ctr = torch.zeros(1, 1, 4, 4)
    batch = {"img": torch.zeros(1, 3, 32, 32),
             "meta": [{"scale": (0.5, 0.25), "orig_size": (64, 100), "img_shape": (32, 32)}]}
    det = dec((cls.split(4), [bbox], [ctr]), batch)[0]
    assert det["labels"].tolist() == [1]
    # input box (12, 4, 36->32 clipped, 16); / (sx=0.25, sy=0.5) -> (48, 8, 128->100, 32)
    torch.testing.assert_close(det["boxes"], torch.tensor([[48.0, 8.0, 100.0, 32.0]]))
    assert math.isclose(float(det["scores"][0]), 1 / (1 + math.exp(-5)), rel_tol=1e-6)


def _raw_for(sizes: list[tuple[int, int]], num_classes: int, logit: float,
             bbox: torch.Tensor) -> tuple[list[torch.Tensor], ...]:
    """Constant class logits, zero centerness logits, per-point ``bbox Tensor[P, 4]``."""
    cls, box, ctr, start = [], [], [], 0
    for h, w in sizes:
        cls.append(torch.full((1, num_classes, h, w), logit))
        box.append(bbox[start:start + h * w].T.reshape(1, 4, h, w))
        ctr.append(torch.zeros(1, 1, h, w))
        start += h * w
    return cls, box, ctr


def test_compute_loss_matches_hand_computed_values(fcos_plugins) -> None:
    model = build(fcos_plugins, num_classes=2, neck={"stack": 1})
    strides, logit = [8, 16, 32, 64, 128], -1.0
    sizes = [(max(64 // s, 1), max(64 // s, 1)) for s in strides]
    points, stride = level_points(sizes, strides, torch.device("cpu"))
    p = 1 / (1 + math.exp(-logit))
    neg = 0.75 * p**2 * -math.log(1 - p)
    # no GT: only negatives, normalised by max(num_pos, 1) = 1
    empty = {"gt_boxes": [torch.zeros(0, 4)], "gt_labels": [torch.zeros(0, dtype=torch.long)]}
    losses = model.compute_loss(_raw_for(sizes, 2, logit, torch.zeros(len(points), 4)), empty)
    assert math.isclose(float(losses["loss_cls"]), model.loss_w[0] * len(points) * 2 * neg,
                        rel_tol=1e-5)
    assert float(losses["loss_bbox"]) == 0 and float(losses["loss_centerness"]) == 0
    # every point predicts exactly the GT box: GIoU loss 0, centerness target (IoU) 1 for every
    # positive, so the centerness BCE per positive is ln 2 with a zero logit
    gt = torch.tensor([[4.0, 6.0, 60.0, 50.0]])
    dist = torch.cat([points - gt[:, :2], gt[:, 2:] - points], 1) / stride[:, None]
    batch = {"gt_boxes": [gt], "gt_labels": [torch.tensor([1])]}
    losses = model.compute_loss(_raw_for(sizes, 2, logit, dist), batch)
    assert abs(float(losses["loss_bbox"])) < 1e-5
    assert math.isclose(float(losses["loss_centerness"]), model.loss_w[2] * math.log(2),
                        rel_tol=1e-5)


def test_a_label_beyond_num_classes_is_a_user_error(fcos_plugins) -> None:
    import pytest
    from helpers import build

    from hatcore.errors import UserError

    model = build(fcos_plugins, num_classes=2, neck={"stack": 1})
    img = torch.randn(2, 3, 128, 128)
    batch = {"img": img, "gt_boxes": [torch.tensor([[4.0, 4.0, 50.0, 50.0]])] * 2,
             "gt_labels": [torch.tensor([1]), torch.tensor([2])],
             "meta": [{"image_id": 7}, {"image_id": 9}]}
    with pytest.raises(UserError, match="num_classes = 2, but image 9 has labels \\[2\\]"):
        model.compute_loss(model(img), batch)
