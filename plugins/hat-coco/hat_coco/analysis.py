"""Per-class results of a predict: AP per class, PR curves at IoU 0.5 and 0.75, confusion matrix.

:func:`analyze` takes a COCO instances dict and detections in the COCO results format (what
``predict/<stage>/detections.json`` holds) and returns a JSON-ready dict (docs/coco.md,
"analysis.json"). AP and PR curves are COCOeval's own (101 recall points, area "all", 100
detections per image), read from its ``precision`` array; the confusion matrix is computed
here (COCOeval has none).
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

import numpy as np

from hat_coco.metric import _backend, coco_from_dict

RECALL_POINTS = np.linspace(0.0, 1.0, 101)
"""COCOeval's recall thresholds: the x axis of every PR curve."""


def analyze(gt: dict[str, Any], results: list[dict[str, Any]],
            image_ids: list[int] | None = None, *, backend: str = "auto",
            score_thr: float = 0.3, iou_thr: float = 0.5) -> dict[str, Any]:
    """Per-class AP, PR curves and a confusion matrix of ``results`` against ``gt``.

    :returns: ``{"classes": [names], "per_class": {name: {"AP", "AP50", "AP75", "gt", "dets"}},
        "pr": {"recall": [101], "iou50": {name|"all": [101] | None}, "iou75": {...}},
        "confusion": {...}}`` (see :func:`confusion_matrix`); AP values 0..1, None for a class
        without ground truth.
    """
    cats = sorted(gt["categories"], key=lambda c: c["id"])
    names = [c["name"] for c in cats]
    ids = sorted(set(image_ids)) if image_ids is not None else [im["id"] for im in gt["images"]]
    precision = _precision(gt, results, ids, backend)  # [T, R, K] or None without detections
    per_class: dict[str, Any] = {}
    pr: dict[str, Any] = {"recall": RECALL_POINTS.round(2).tolist(), "iou50": {}, "iou75": {}}
    wanted = set(ids)
    n_gt = {c["id"]: 0 for c in cats}
    for a in gt["annotations"]:
        if a["image_id"] in wanted and not a.get("iscrowd", 0) and a["category_id"] in n_gt:
            n_gt[a["category_id"]] += 1
    n_det = {c["id"]: 0 for c in cats}
    for r in results:
        if r["image_id"] in wanted and r["category_id"] in n_det:
            n_det[r["category_id"]] += 1
    for k, c in enumerate(cats):
        has_gt = n_gt[c["id"]] > 0
        p = precision[:, :, k] if precision is not None else np.zeros((10, 101))
        per_class[c["name"]] = {
            "AP": float(p.mean()) if has_gt else None,
            "AP50": float(p[0].mean()) if has_gt else None,
            "AP75": float(p[5].mean()) if has_gt else None,
            "gt": n_gt[c["id"]], "dets": n_det[c["id"]]}
        pr["iou50"][c["name"]] = p[0].tolist() if has_gt else None
        pr["iou75"][c["name"]] = p[5].tolist() if has_gt else None
    for key in ("iou50", "iou75"):
        curves = [v for v in pr[key].values() if v is not None]
        pr[key]["all"] = np.mean(curves, axis=0).tolist() if curves else None
    return {"classes": names, "per_class": per_class, "pr": pr,
            "confusion": confusion_matrix(gt, results, ids, score_thr=score_thr,
                                          iou_thr=iou_thr)}


def _precision(gt: dict[str, Any], results: list[dict[str, Any]], ids: list[int],
               backend: str) -> np.ndarray | None:
    """COCOeval's interpolated precision ``[T=10, R=101, K]`` (area all, maxDets 100); classes
    without ground truth are 0 (COCOeval marks them -1)."""
    if not results:
        return None
    coco_cls, eval_cls = _backend(backend)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = coco_from_dict(coco_cls, gt)
        ev = eval_cls(coco_gt, coco_gt.loadRes(results), iouType="bbox")
        ev.params.imgIds = ids
        ev.params.catIds = sorted(c["id"] for c in gt["categories"])
        ev.evaluate()
        ev.accumulate()
    p = np.asarray(ev.eval["precision"])[:, :, :, 0, -1]
    return np.where(p < 0, 0.0, p)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of COCO xywh boxes ``a[N, 4]`` and ``b[M, 4]`` -> ``[N, M]``."""
    ax2, ay2 = a[:, 0] + a[:, 2], a[:, 1] + a[:, 3]
    bx2, by2 = b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    iw = np.minimum(ax2[:, None], bx2[None]) - np.maximum(a[:, None, 0], b[None, :, 0])
    ih = np.minimum(ay2[:, None], by2[None]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    union = (a[:, 2] * a[:, 3])[:, None] + (b[:, 2] * b[:, 3])[None] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def confusion_matrix(gt: dict[str, Any], results: list[dict[str, Any]], image_ids: list[int],
                     *, score_thr: float = 0.3, iou_thr: float = 0.5) -> dict[str, Any]:
    """Ground truth vs detections (score >= ``score_thr``), one image at a time.

    Pairs (any classes) with IoU >= ``iou_thr`` are matched greedily, highest IoU first, each
    box at most once; a match counts in ``matrix[true][predicted]``, an unmatched ground-truth
    box in ``[true][background]`` (missed), an unmatched detection in ``[background][predicted]``
    (a false alarm) unless it lies on a crowd box (IoU >= ``iou_thr``: ignored, as COCOeval
    does). ``[background][background]`` stays 0.

    :returns: ``{"labels": names + ["background"], "matrix": [[int]] (rows: ground truth,
        columns: predicted), "score_thr", "iou_thr"}``.
    """
    cats = sorted(c["id"] for c in gt["categories"])
    label = {cid: i for i, cid in enumerate(cats)}
    bg = len(cats)
    m = np.zeros((bg + 1, bg + 1), np.int64)
    wanted = set(image_ids)
    gts: dict[int, list[dict[str, Any]]] = {i: [] for i in wanted}
    dets: dict[int, list[dict[str, Any]]] = {i: [] for i in wanted}
    for a in gt["annotations"]:
        if a["image_id"] in wanted and a["category_id"] in label:
            gts[a["image_id"]].append(a)
    for r in results:
        if r["image_id"] in wanted and r["category_id"] in label and r["score"] >= score_thr:
            dets[r["image_id"]].append(r)
    for image_id in wanted:
        real = [a for a in gts[image_id] if not a.get("iscrowd", 0)]
        crowd = [a for a in gts[image_id] if a.get("iscrowd", 0)]
        found = dets[image_id]
        used_g: set[int] = set()
        used_d: set[int] = set()
        if real and found:
            iou = box_iou(_boxes(real), _boxes(found))
            for g, d in sorted(zip(*np.nonzero(iou >= iou_thr), strict=True),
                               key=lambda gd: -iou[gd]):
                if g in used_g or d in used_d:
                    continue
                used_g.add(g)
                used_d.add(d)
                m[label[real[g]["category_id"]], label[found[d]["category_id"]]] += 1
        for g, a in enumerate(real):
            if g not in used_g:
                m[label[a["category_id"]], bg] += 1
        on_crowd = (box_iou(_boxes(found), _boxes(crowd)).max(1) >= iou_thr
                    if crowd and found else np.zeros(len(found), bool))
        for d, r in enumerate(found):
            if d not in used_d and not on_crowd[d]:
                m[bg, label[r["category_id"]]] += 1
    names = {c["id"]: c["name"] for c in gt["categories"]}
    return {"labels": [names[c] for c in cats] + ["background"], "matrix": m.tolist(),
            "score_thr": score_thr, "iou_thr": iou_thr}


def _boxes(items: list[dict[str, Any]]) -> np.ndarray:
    return np.asarray([x["bbox"] for x in items], np.float64).reshape(-1, 4)
