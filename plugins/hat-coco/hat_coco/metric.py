"""COCO bbox evaluation (faster-coco-eval when importable, else pycocotools)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hatcore.errors import UserError

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")


def _backend(name: str) -> tuple[Any, Any]:
    """``(COCO, COCOeval)`` classes of the chosen backend."""
    if name in ("auto", "faster_coco_eval"):
        try:
            from faster_coco_eval import COCO, COCOeval_faster

            return COCO, COCOeval_faster
        except ImportError:
            if name == "faster_coco_eval":
                raise UserError("metric.backend = 'faster_coco_eval', but it is not installed "
                                "(pip install faster-coco-eval)") from None
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    return COCO, COCOeval


def coco_from_dict(coco_cls: Any, data: dict[str, Any]) -> Any:
    """A COCO API object from an in-memory instances dict (both backends)."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = coco_cls()
        coco.dataset = data
        coco.createIndex()
    return coco


def evaluate(gt: dict[str, Any], results: list[dict[str, Any]], image_ids: list[int] | None = None,
             backend: str = "auto") -> dict[str, Any]:
    """COCO bbox AP/AR of ``results`` (COCO results format) against ``gt`` (instances dict).

    :returns: ``{"bbox": {AP, AP50, ..., AR100}, "per_class": {name: AP}}``, values 0..1.
    """
    coco_cls, eval_cls = _backend(backend)
    names = {c["id"]: c["name"] for c in gt["categories"]}
    if not results:
        return {"bbox": dict.fromkeys(STAT_NAMES, 0.0),
                "per_class": dict.fromkeys(names.values(), 0.0)}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = coco_from_dict(coco_cls, gt)
        coco_dt = coco_gt.loadRes(results)
        ev = eval_cls(coco_gt, coco_dt, iouType="bbox")
        if image_ids is not None:
            ev.params.imgIds = sorted(set(image_ids))
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = [max(float(v), 0.0) for v in ev.stats[: len(STAT_NAMES)]]
    precision = np.asarray(ev.eval["precision"])  # [T, R, K, A, M]
    per_class = {}
    for k, cid in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        per_class[names[cid]] = float(p.mean()) if p.size else 0.0
    return {"bbox": dict(zip(STAT_NAMES, stats, strict=True)), "per_class": per_class}


class CocoMetric:
    """Collects detections over a validation pass and scores them with the COCO API.

    Detections are in original-image pixels (the task-model contract); labels are mapped to the
    dataset's category ids, boxes to COCO xywh, image ids taken from ``batch["meta"]``.
    """

    def __init__(self, dataset: Any, backend: str = "auto", max_dets: int = 100) -> None:
        for attr in ("coco_gt", "cat_ids"):
            if not hasattr(dataset, attr):
                raise UserError(f"the coco metric needs a dataset with `{attr}` (coco, coco_lmdb "
                                f"or shapes), got {type(dataset).__name__}")
        self.dataset, self.backend, self.max_dets = dataset, backend, max_dets
        self.reset()

    def reset(self) -> None:
        self.results: list[dict[str, Any]] = []
        self.image_ids: list[int] = []

    def update(self, detections: list[dict[str, torch.Tensor]], batch: dict[str, Any]) -> None:
        """Add one batch: ``detections[i]`` has boxes Tensor[N, 4] xyxy, scores, labels."""
        cat_ids = self.dataset.cat_ids
        for det, meta in zip(detections, batch["meta"], strict=True):
            image_id = int(meta["image_id"])
            self.image_ids.append(image_id)
            scores = det["scores"].detach().float().cpu()
            order = scores.argsort(descending=True)[: self.max_dets]
            boxes = det["boxes"].detach().float().cpu()[order].tolist()
            labels = det["labels"].cpu()[order].tolist()
            for (x1, y1, x2, y2), s, lab in zip(boxes, scores[order].tolist(), labels, strict=True):
                self.results.append({"image_id": image_id, "category_id": cat_ids[int(lab)],
                                     "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2),
                                              round(y2 - y1, 2)], "score": round(s, 5)})

    def _gather(self) -> tuple[list[dict[str, Any]], list[int]]:
        import torch.distributed as tdist

        if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
            return self.results, self.image_ids
        parts: list[Any] = [None] * tdist.get_world_size()
        tdist.all_gather_object(parts, (self.results, self.image_ids))
        # a DistributedSampler repeats images to even out ranks: keep each image's first copy
        unique: list[dict[str, Any]] = []
        ids: list[int] = []
        for results, image_ids in parts:
            fresh = set(image_ids) - set(ids)
            unique += [r for r in results if r["image_id"] in fresh]
            ids += sorted(fresh)
        return unique, ids

    def compute(self, out_dir: Path | None = None) -> dict[str, Any]:
        """Score everything collected; with ``out_dir``, rank 0 writes detections.json,
        metrics.json and analysis.json (per-class AP, PR curves, confusion matrix)."""
        import torch.distributed as tdist

        results, ids = self._gather()
        rank0 = not (tdist.is_available() and tdist.is_initialized()) or tdist.get_rank() == 0
        gt = self.dataset.coco_gt()
        out = evaluate(gt, results, ids or None, self.backend)
        if out_dir is not None and rank0:
            from hat_coco.analysis import analyze

            out_dir = Path(out_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "detections.json").write_text(json.dumps(results))
            (out_dir / "metrics.json").write_text(json.dumps(out, indent=2))
            (out_dir / "analysis.json").write_text(
                json.dumps(analyze(gt, results, ids or None, backend=self.backend)))
        return out
