"""Per-class AP, PR curves and the confusion matrix, against small cases worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
from hat_coco.analysis import analyze, box_iou, confusion_matrix


def _gt(images: list[int], anns: list[tuple], names: tuple[str, ...] = ("a",)) -> dict:
    """anns: (image_id, category_id, [x, y, w, h], iscrowd)."""
    return {"images": [{"id": i, "file_name": f"{i}.jpg", "height": 200, "width": 200}
                       for i in images],
            "annotations": [{"id": k, "image_id": i, "category_id": c, "bbox": b,
                             "area": b[2] * b[3], "iscrowd": crowd}
                            for k, (i, c, b, crowd) in enumerate(anns, 1)],
            "categories": [{"id": k, "name": n} for k, n in enumerate(names, 1)]}


def _det(image_id: int, cat: int, box: list[float], score: float) -> dict:
    return {"image_id": image_id, "category_id": cat, "bbox": box, "score": score}


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_pr_curves_and_ap_match_the_hand_computed_ones(backend: str) -> None:
    # two boxes of class a; detections by score: exact hit, a miss, a hit at IoU 0.68
    gt = _gt([1], [(1, 1, [0, 0, 10, 10], 0), (1, 1, [100, 100, 10, 10], 0)])
    dets = [_det(1, 1, [0, 0, 10, 10], 0.9), _det(1, 1, [50, 50, 10, 10], 0.8),
            _det(1, 1, [100, 100, 10, 6.8], 0.7)]
    out = analyze(gt, dets, backend=backend)
    # IoU 0.5: TP FP TP -> (recall, precision) (.5, 1) (.5, .5) (1, 2/3); interpolated:
    # precision 1 up to recall .50 (51 of the 101 points), 2/3 above (50 points)
    want50 = [1.0] * 51 + [2 / 3] * 50
    # IoU 0.75: TP FP FP -> recall never passes .5: 1 up to .50, 0 above
    want75 = [1.0] * 51 + [0.0] * 50
    assert out["pr"]["iou50"]["a"] == pytest.approx(want50)
    assert out["pr"]["iou75"]["a"] == pytest.approx(want75)
    assert out["pr"]["iou50"]["all"] == pytest.approx(want50)  # one class: the same curve
    ap50, ap75 = (51 + 50 * 2 / 3) / 101, 51 / 101
    row = out["per_class"]["a"]
    assert row["AP50"] == pytest.approx(ap50) and row["AP75"] == pytest.approx(ap75)
    # IoU thresholds .50 .55 .60 .65 take the 0.68 box (AP50's curve), .70 ... .95 do not
    assert row["AP"] == pytest.approx((4 * ap50 + 6 * ap75) / 10)
    assert (row["gt"], row["dets"]) == (2, 3)
    assert out["pr"]["recall"][:3] == [0.0, 0.01, 0.02] and len(out["pr"]["recall"]) == 101


def test_overall_curve_is_the_mean_of_the_classes_and_absent_classes_are_none() -> None:
    gt = _gt([1], [(1, 1, [0, 0, 10, 10], 0), (1, 2, [50, 50, 10, 10], 0)], ("a", "b", "c"))
    dets = [_det(1, 1, [0, 0, 10, 10], 0.9)]  # a found, b missed, c has no ground truth
    out = analyze(gt, dets, backend="pycocotools")
    assert out["pr"]["iou50"]["a"] == pytest.approx([1.0] * 101)
    assert out["pr"]["iou50"]["b"] == pytest.approx([0.0] * 101)
    assert out["pr"]["iou50"]["all"] == pytest.approx([0.5] * 101)
    assert out["per_class"]["c"] == {"AP": None, "AP50": None, "AP75": None, "gt": 0, "dets": 0}
    assert out["pr"]["iou50"]["c"] is None


def test_confusion_matrix_counts_hits_confusions_misses_and_false_alarms() -> None:
    gt = _gt([1, 2], [(1, 1, [0, 0, 10, 10], 0),      # a, found as a
                      (1, 2, [20, 20, 10, 10], 0),    # b, found as a (confusion)
                      (2, 1, [0, 0, 10, 10], 0),      # a, missed
                      (2, 2, [30, 30, 20, 20], 1)],   # crowd b: detections on it are ignored
             ("a", "b"))
    dets = [_det(1, 1, [0, 0, 10, 10], 0.9), _det(1, 1, [20, 20, 10, 10], 0.8),
            _det(1, 2, [50, 50, 5, 5], 0.7),          # nothing there: a false alarm of b
            _det(1, 1, [1, 1, 10, 10], 0.1),          # under the score threshold
            _det(2, 2, [30, 30, 20, 20], 0.9),        # on the crowd box
            _det(3, 1, [0, 0, 10, 10], 0.9)]          # an image not evaluated
    cm = confusion_matrix(gt, dets, [1, 2], score_thr=0.3, iou_thr=0.5)
    assert cm["labels"] == ["a", "b", "background"]
    assert cm["matrix"] == [[1, 0, 1],   # true a: 1 as a, 1 missed
                            [1, 0, 0],   # true b: 1 taken for a
                            [0, 1, 0]]   # background: 1 false b


def test_confusion_matching_takes_the_best_pair_first() -> None:
    # one detection overlaps two boxes; it belongs to the one it overlaps most (IoU 0.82 vs 0.54)
    gt = _gt([1], [(1, 1, [0, 0, 10, 10], 0), (1, 2, [0, 4, 10, 10], 0)], ("a", "b"))
    dets = [_det(1, 2, [0, 1, 10, 10], 0.9)]
    iou = box_iou(np.array([[0, 0, 10, 10], [0, 4, 10, 10]], float),
                  np.array([[0, 1, 10, 10]], float))
    assert iou[:, 0] == pytest.approx([90 / 110, 70 / 130])
    cm = confusion_matrix(gt, dets, [1])
    assert cm["matrix"] == [[0, 1, 0], [0, 0, 1], [0, 0, 0]]


def test_no_detections_gives_zero_curves_and_all_missed() -> None:
    gt = _gt([1], [(1, 1, [0, 0, 10, 10], 0)])
    out = analyze(gt, [])
    assert out["per_class"]["a"]["AP"] == 0.0 and out["pr"]["iou75"]["all"] == [0.0] * 101
    assert out["confusion"]["matrix"] == [[0, 1], [0, 0]]


def test_predict_metric_writes_analysis_json_next_to_metrics_json(tmp_path) -> None:
    import json

    import torch
    from hat_coco import specs as S
    from hat_coco.plugin import build_metric

    gt = _gt([1], [(1, 1, [0, 0, 10, 10], 0), (1, 2, [50, 50, 20, 20], 0)], ("a", "b"))

    class Data:
        cat_ids = [1, 2]

        def coco_gt(self) -> dict:
            return gt

    metric = build_metric(spec=S.CocoMetricSpec(type="coco", backend="pycocotools"),
                          dataset=Data())
    metric.reset()
    metric.update([{"boxes": torch.tensor([[0.0, 0, 10, 10], [50, 50, 70, 70]]),
                    "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([0, 0])}],
                  {"meta": [{"image_id": 1}]})
    out = metric.compute(tmp_path)
    analysis = json.loads((tmp_path / "analysis.json").read_text())
    assert {k: v["AP"] for k, v in analysis["per_class"].items()} == pytest.approx(
        out["per_class"])
    assert out["per_class"] == pytest.approx({"a": 1.0, "b": 0.0})
    assert analysis["confusion"]["matrix"] == [[1, 0, 0], [1, 0, 0], [0, 0, 0]]  # b taken for a
