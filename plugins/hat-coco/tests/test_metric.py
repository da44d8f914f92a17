"""The COCO metric: a hand-made case with a known AP, both backends equal to pycocotools."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hat_coco import specs as S
from hat_coco.metric import STAT_NAMES, evaluate
from hat_coco.plugin import build_dataset, build_metric, build_transform
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


class _GtOnly:
    """A dataset stand-in: two images, category ids 3 ("B") and 7 ("A")."""

    cat_ids = [3, 7]
    class_names = ["B", "A"]

    def coco_gt(self) -> dict:
        img = [{"id": i, "file_name": f"{i}.jpg", "height": 200, "width": 200} for i in (11, 12)]
        anns = [
            {"id": 1, "image_id": 11, "category_id": 7, "bbox": [10, 10, 60, 60], "area": 3600,
             "iscrowd": 0},
            {"id": 2, "image_id": 12, "category_id": 7, "bbox": [100, 50, 80, 40], "area": 3200,
             "iscrowd": 0},
            {"id": 3, "image_id": 11, "category_id": 3, "bbox": [120, 120, 50, 70], "area": 3500,
             "iscrowd": 0},
        ]
        return {"images": img, "annotations": anns,
                "categories": [{"id": 3, "name": "B"}, {"id": 7, "name": "A"}]}


def _detections() -> tuple[list[dict], dict]:
    """A: both found exactly (AP 1). B: a confident false positive, then the hit (AP 0.5)."""
    det11 = {"boxes": torch.tensor([[0.0, 0, 30, 30], [10, 10, 70, 70], [120, 120, 170, 190]]),
             "scores": torch.tensor([0.95, 0.9, 0.5]), "labels": torch.tensor([0, 1, 0])}
    det12 = {"boxes": torch.tensor([[100.0, 50, 180, 90]]), "scores": torch.tensor([0.8]),
             "labels": torch.tensor([1])}
    batch = {"meta": [{"image_id": 11}, {"image_id": 12}]}
    return [det11, det12], batch


@pytest.mark.parametrize("backend", ["faster_coco_eval", "pycocotools"])
def test_hook_build_metric_coco_known_ap_equals_pycocotools(tmp_path: Path, backend: str) -> None:
    metric = build_metric(spec=S.CocoMetricSpec(type="coco", backend=backend), dataset=_GtOnly())
    metric.reset()
    dets, batch = _detections()
    metric.update(dets, batch)
    out = metric.compute(tmp_path)
    assert out["bbox"]["AP"] == pytest.approx(0.75)
    assert out["bbox"]["AP50"] == pytest.approx(0.75)
    assert out["per_class"] == pytest.approx({"A": 1.0, "B": 0.5})
    results = json.loads((tmp_path / "detections.json").read_text())
    assert {r["category_id"] for r in results} == {3, 7}
    assert [10, 10, 60, 60] in [r["bbox"] for r in results]
    assert json.loads((tmp_path / "metrics.json").read_text()) == json.loads(json.dumps(out))
    # the reference: pycocotools' own COCOeval on the same files
    gt = COCO()
    gt.dataset = _GtOnly().coco_gt()
    gt.createIndex()
    ev = COCOeval(gt, gt.loadRes(str(tmp_path / "detections.json")), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    for name, ref in zip(STAT_NAMES, ev.stats, strict=False):
        assert out["bbox"][name] == pytest.approx(max(float(ref), 0.0), abs=1e-9), name
    assert set(out["bbox"]) == set(STAT_NAMES)


def test_no_detections_scores_zero(tmp_path: Path) -> None:
    metric = build_metric(spec=S.CocoMetricSpec(type="coco"), dataset=_GtOnly())
    out = metric.compute(tmp_path)
    assert out["bbox"]["AP"] == 0.0 and json.loads((tmp_path / "detections.json").read_text()) == []


def test_ground_truth_as_detections_scores_one_through_the_resize(shapes_root: Path) -> None:
    """Boxes in input pixels mapped back with meta["scale"] must land on the originals."""
    tf = [build_transform(spec=S.ResizeSpec(type="resize", img_scale=[100, 100])),
          build_transform(spec=S.ToTensorSpec(type="to_tensor"))]
    spec = S.ShapesSpec(type="shapes", root=str(shapes_root), num_images=12, image_size=160)
    ds = build_dataset(spec=spec, split="val", transforms=tf)
    metric = build_metric(spec=S.CocoMetricSpec(type="coco"), dataset=ds)
    for start in range(0, len(ds), 4):
        batch = ds.collate_fn([ds[i] for i in range(start, min(start + 4, len(ds)))])
        dets = []
        for boxes, labels, meta in zip(batch["gt_boxes"], batch["gt_labels"], batch["meta"],
                                       strict=True):
            sy, sx = meta["scale"]
            dets.append({"boxes": boxes / torch.tensor([sx, sy, sx, sy]),
                         "scores": torch.ones(len(boxes)), "labels": labels})
        metric.update(dets, batch)
    out = metric.compute(None)
    assert out["bbox"]["AP"] == pytest.approx(1.0)
    assert evaluate(ds.coco_gt(), [], None)["bbox"]["AP"] == 0.0


def _rank(rank: int, init: str, out_dir: str) -> None:
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        metric = build_metric(spec=S.CocoMetricSpec(type="coco"), dataset=_GtOnly())
        dets, batch = _detections()
        if rank == 0:
            metric.update(dets[:1], {"meta": batch["meta"][:1]})
        else:  # image 12, then image 11 again: a DistributedSampler's padding repeat
            metric.update([dets[1], dets[0]], {"meta": [batch["meta"][1], batch["meta"][0]]})
        out = metric.compute(Path(out_dir) / f"rank{rank}" if rank else Path(out_dir))
        assert out["bbox"]["AP"] == pytest.approx(0.75), out
    finally:
        tdist.destroy_process_group()


def test_metric_gathers_to_rank0_under_torch_distributed(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    init = f"file://{tmp_path / 'rendezvous'}"
    mp.start_processes(_rank, args=(init, str(tmp_path)), nprocs=2, start_method="spawn")
    results = json.loads((tmp_path / "detections.json").read_text())
    assert len(results) == 4, "each detection once, the repeated image not counted twice"
    assert not (tmp_path / "rank1").exists(), "only rank 0 writes"
