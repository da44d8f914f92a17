"""HAT's DynamicFcosTarget on a hand-worked two-GT example, centre sampling, and the loss weights.

Every expected value below is worked out by hand (the arithmetic is in the comments and in
plain ``math``), never by calling the code under test.
"""

from __future__ import annotations

import math

import torch
from hat_fcos.boxes import level_points
from hat_fcos.decoder import FCOSDecoder
from hat_fcos.model import FCOS
from hat_fcos.target import assign, candidates, centerness_target
from torch import nn

# One level, stride 8, a 3x3 grid: point i = (4 + 8 (i % 3), 4 + 8 (i // 3)).
#   0 (4,4)   1 (12,4)   2 (20,4)
#   3 (4,12)  4 (12,12)  5 (20,12)
#   6..8: y = 20, outside both boxes
# GT A = [0, 0, 16, 16] label 0 holds points 0, 1, 3, 4; GT B = [8, 0, 24, 16] label 1 holds
# 1, 2, 4, 5. With radius 2.5 x 8 = 20 px the centre regions are the boxes themselves.
GT = torch.tensor([[0.0, 0.0, 16.0, 16.0], [8.0, 0.0, 24.0, 16.0]])
LABELS = torch.tensor([0, 1])
# Predicted boxes (pixels), each containing its point, and their IoU with A and B (each box lies
# inside the GT it is compared with, or spans exactly both, so GIoU = IoU in every used pair):
PRED_BOXES = {
    0: [0, 0, 16, 16],   # = A: IoU_A 1
    1: [0, 0, 24, 16],   # A u B: IoU_A = IoU_B = 256/384 = 2/3
    2: [16, 0, 22, 16],  # 96 px inside B: IoU_B 0.375
    3: [0, 4, 12, 16],   # 144 px inside A: IoU_A 0.5625
    4: [8, 0, 24, 16],   # = B: IoU_B 1, IoU_A 128/384 = 1/3
    5: [18, 8, 24, 16],  # 48 px inside B: IoU_B 0.1875
}


def _setup() -> tuple[torch.Tensor, ...]:
    points, stride = level_points([(3, 3)], [8], torch.device("cpu"))
    dist = torch.zeros(9, 4)
    for i, (x1, y1, x2, y2) in PRED_BOXES.items():
        x, y = points[i].tolist()
        dist[i] = torch.tensor([x - x1, y - y1, x2 - x, y2 - y]) / 8  # in strides
    logits = torch.zeros(9, 2)
    logits[1, 0] = 1.0  # point 1 leans to class 0: breaks the A/B tie there
    return points, stride, dist, logits


def _focal_pos(x: float) -> float:  # alpha 0.25, gamma 2, target 1
    p = 1 / (1 + math.exp(-x))
    return 0.25 * (1 - p) ** 2 * -math.log(p)


def _focal_neg(x: float) -> float:  # target 0
    p = 1 / (1 + math.exp(-x))
    return 0.75 * p**2 * -math.log(1 - p)


def test_two_gts_k_truncated_conflict_to_the_cheaper_gt_and_no_fallback() -> None:
    points, stride, dist, logits = _setup()
    c0 = _focal_pos(0) + _focal_neg(0)  # class cost where both logits are 0
    # costs = focal over both classes + 2 (1 - GIoU)
    cost_a = {0: c0, 1: _focal_pos(1) + _focal_neg(0) + 2 / 3, 3: c0 + 2 * (1 - 0.5625),
              4: c0 + 2 * (1 - 1 / 3)}
    cost_b = {1: _focal_neg(1) + _focal_pos(0) + 2 / 3, 2: c0 + 2 * (1 - 0.375),
              4: c0, 5: c0 + 2 * (1 - 0.1875)}
    # k_A = int(1 + 2/3 + 0.5625 + 1/3) = int(2.5625) = 2 (rounding would give 3);
    # k_B = int(2/3 + 0.375 + 1 + 0.1875) = int(2.229) = 2
    assert sorted(cost_a, key=cost_a.get)[:2] == [0, 1]  # A takes 0 and 1 (3 would be third)
    assert sorted(cost_b, key=cost_b.get)[:2] == [4, 1]  # B takes 4 and 1
    assert cost_a[1] < cost_b[1]  # point 1 is claimed by both: it goes to A
    a = assign(points, stride, dist, logits, GT, LABELS, topk=10)
    # B keeps only point 4 (it lost point 1 and, as in HAT, gets no replacement)
    assert a.gt_index.tolist() == [0, 0, -1, -1, 1, -1, -1, -1, -1]
    torch.testing.assert_close(a.ctr_target, torch.tensor([1, 2 / 3, 0, 0, 1, 0, 0, 0, 0.0]))
    # regression targets in strides: point 0 to A (4, 4, 12, 12) px, point 1 to A (12, 4, 4, 12),
    # point 4 to B (4, 12, 12, 4)
    torch.testing.assert_close(a.box_target[[0, 1, 4]], torch.tensor(
        [[0.5, 0.5, 1.5, 1.5], [1.5, 0.5, 0.5, 1.5], [0.5, 1.5, 1.5, 0.5]]))


def test_topk_caps_the_iou_sum() -> None:
    points, stride, dist, logits = _setup()
    # topK = 1: k_A = int(1.0) = 1 (its best IoU), k_B = int(2/3) -> clamped to 1
    a = assign(points, stride, dist, logits, GT, LABELS, topk=1)
    assert a.gt_index.tolist() == [0, -1, -1, -1, 1, -1, -1, -1, -1]


def test_centre_sampling_keeps_points_within_radius_strides_of_the_centre() -> None:
    points, stride = level_points([(6, 6)], [8], torch.device("cpu"))  # x, y in 4, 12, ..., 44
    gt = torch.tensor([[0.0, 0.0, 48.0, 48.0]])  # centre (24, 24)
    inside = candidates(points, stride, gt, center_sampling=False, radius=2.5)
    r1 = candidates(points, stride, gt, center_sampling=True, radius=1.0)
    r25 = candidates(points, stride, gt, center_sampling=True, radius=2.5)
    # radius 1: (16, 32) strictly -> x, y in {20, 28}: 4 points; radius 2.5: (4, 44) strictly ->
    # {12, 20, 28, 36}: 16 points; no sampling: every point of the 6x6 grid
    assert int(inside.sum()) == 36 and int(r25.sum()) == 16 and int(r1.sum()) == 4
    assert sorted(points[r1[:, 0]].tolist()) == [[20, 20], [20, 28], [28, 20], [28, 28]]
    # the region scales with each point's own stride: at stride 16 (points 8, 24, 40) radius 1
    # reaches (8, 40) strictly: only x, y = 24
    p16, s16 = level_points([(3, 3)], [16], torch.device("cpu"))
    assert p16[candidates(p16, s16, gt, True, 1.0)[:, 0]].tolist() == [[24.0, 24.0]]


def test_centerness_target_by_hand() -> None:
    # (l, t, r, b) = (1, 2, 3, 4): sqrt(1/3 * 2/4); a centred point: 1
    got = centerness_target(torch.tensor([[1.0, 2.0, 3.0, 4.0], [2.0, 5.0, 2.0, 5.0]]))
    torch.testing.assert_close(got, torch.tensor([math.sqrt(1 / 6), 1.0]))


def test_loss_weights_on_the_two_gt_example() -> None:
    points, stride, dist, logits = _setup()
    model = FCOS(nn.Identity(), nn.Identity(), nn.Identity(), [8], 2, FCOSDecoder([8]))
    raw = ([logits.T.reshape(1, 2, 3, 3)], [dist.T.reshape(1, 4, 3, 3)], [torch.zeros(1, 1, 3, 3)])
    batch = {"gt_boxes": [GT], "gt_labels": [LABELS]}
    losses = model.compute_loss(raw, batch)
    # positives 0 (A), 1 (A), 4 (B); GIoU 1, 2/3, 1. Geometric centerness of their targets:
    # (4,4,12,12) -> 1/3, (12,4,4,12) -> 1/3, (4,12,12,4) -> 1/3. Weighted mean, times 2.0:
    w = [1 / 3, 1 / 3, 1 / 3]
    expected_bbox = 2.0 * (w[0] * 0 + w[1] * (1 / 3) + w[2] * 0) / sum(w)
    assert math.isclose(float(losses["loss_bbox"]), expected_bbox, rel_tol=1e-5)
    # (weighted by the predicted IoU, as before HAT's rule, it would be 2 * (2/9) / (8/3) = 1/6)
    assert not math.isclose(expected_bbox, 1 / 6)
    # classification: focal over 9 points x 2 classes / 3 positives; only logit [1, 0] is 1.
    # Targets 1: (0, A=0) and (4, B=1) at logit 0, (1, 0) at logit 1; the other 15 are 0 at 0.
    focal = (2 * _focal_pos(0) + _focal_pos(1) + 15 * _focal_neg(0)) / 3
    assert math.isclose(float(losses["loss_cls"]), focal, rel_tol=1e-5)
    # centerness: BCE of a zero logit is ln 2 whatever the target
    assert math.isclose(float(losses["loss_centerness"]), math.log(2), rel_tol=1e-5)


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_decoder_thresholds_the_class_score_and_ranks_by_sqrt_cls_ctr() -> None:
    dec = FCOSDecoder([8], score_thr=0.05)
    cls = torch.full((1, 1, 2, 2), -20.0)
    ctr = torch.zeros(1, 1, 2, 2)
    cls[0, 0, 0, 0], ctr[0, 0, 0, 0] = _logit(0.5), _logit(0.001)  # sqrt(5e-4) = 0.0224: kept
    cls[0, 0, 1, 1], ctr[0, 0, 1, 1] = _logit(0.04), _logit(0.99)  # class 0.04 < 0.05: dropped
    bbox = torch.ones(1, 4, 2, 2)  # 16 px squares, apart: no suppression
    det = dec(([cls], [bbox], [ctr]), {"img": torch.zeros(1, 3, 16, 16)})[0]
    assert len(det["scores"]) == 1
    assert math.isclose(float(det["scores"][0]), math.sqrt(0.5 * 0.001), rel_tol=1e-4)
    torch.testing.assert_close(det["boxes"], torch.tensor([[0.0, 0.0, 12.0, 12.0]]))
