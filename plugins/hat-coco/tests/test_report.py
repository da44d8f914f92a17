"""hat-coco in the run report: the comparison drawings (``draw_comparison``) and the sections
read from analysis.json (``report_sections``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
from hat_coco import specs as S
from hat_coco.analysis import analyze
from hat_coco.compare import GAP
from hat_coco.plugin import build_dataset, build_transform, draw_comparison, report_sections

from hatcore.plugins import make_plugin_manager


def _val(shapes_root: Path):  # type: ignore[no-untyped-def]
    spec = S.ShapesSpec(type="shapes", root=str(shapes_root), num_images=12, image_size=160)
    return build_dataset(spec=spec, split="val",
                         transforms=[build_transform(spec=S.ToTensorSpec(type="to_tensor"))])


def test_hook_draw_comparison_puts_ground_truth_and_each_row_side_by_side(
        tmp_path: Path, shapes_root: Path) -> None:
    ds = _val(shapes_root)
    rec = ds.records[0]
    x, y, w, h = rec["bboxes"][0]
    hit = {"image_id": rec["image_id"], "category_id": rec["category_ids"][0],
           "bbox": [x, y, w, h], "score": 0.9}
    low = {**hit, "score": 0.1}  # under the threshold: not drawn
    pm = make_plugin_manager()
    written = pm.hook.draw_comparison(dataset=ds, detections={"float": [hit], "deployed": [low]},
                                      out_dir=tmp_path / "cmp", n=2, score_thr=0.3)
    assert written == [tmp_path / "cmp" / f"{r['image_id']}.jpg" for r in ds.records[:2]]
    img = cv2.imread(str(written[0]))
    assert img.shape[1] == 3 * 160 + 2 * GAP and img.shape[0] > 160  # three titled panels
    strip = img.shape[0] - 160
    panels = [img[strip:, k * (160 + GAP):k * (160 + GAP) + 160].astype(int) for k in range(3)]
    # the bottom edge of the box: drawn in the ground truth and float panels, in the same
    # (class) colour, and not in the deployed panel, whose one detection is under the threshold
    drawn = np.abs(panels[1] - panels[2]).max(2) > 40  # float minus deployed: the box alone
    bottom = round(y + h)
    assert drawn[bottom - 1:bottom + 2, round(x + 2):round(x + w - 2)].any(0).mean() > 0.6
    # nothing else differs: below the box, or right of it under its label (label ~ 12 px high)
    assert not drawn[bottom + 3:].any() and not drawn[round(y) + 16:, round(x + w) + 3:].any()
    gt_drawn = np.abs(panels[0] - panels[2]).max(2) > 40
    assert gt_drawn[bottom - 1:bottom + 2, round(x + 2):round(x + w - 2)].any(0).mean() > 0.6
    assert draw_comparison(dataset=[1, 2], detections={}, out_dir=tmp_path, n=1,
                           score_thr=0.3) is None  # not a dataset of this plugin


def _write_analysis(work: Path, row: str, gt: dict, dets: list[dict]) -> dict:
    out = analyze(gt, dets, backend="pycocotools")
    (work / "predict" / row).mkdir(parents=True)
    (work / "predict" / row / "analysis.json").write_text(json.dumps(out))
    return out


def test_hook_report_sections_from_analysis_json(tmp_path: Path) -> None:
    gt = {"images": [{"id": 1, "file_name": "1.jpg", "height": 100, "width": 100}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10],
                           "area": 100, "iscrowd": 0},
                          {"id": 2, "image_id": 1, "category_id": 2, "bbox": [50, 50, 20, 20],
                           "area": 400, "iscrowd": 0}],
          "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}
    exact = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9},
             {"image_id": 1, "category_id": 2, "bbox": [50, 50, 20, 20], "score": 0.8}]
    wrong = [{**exact[0]}, {**exact[1], "category_id": 1}]  # the dog called a cat
    a = _write_analysis(tmp_path, "float", gt, exact)
    b = _write_analysis(tmp_path, "deployed", gt, wrong)
    summary = {"stages": [{"stage": "float"}, {"stage": "deployed"}, {"stage": "missing"}]}
    found = make_plugin_manager().hook.report_sections(work_dir=tmp_path, summary=summary)
    sections = {s.id: s for group in found for s in group}
    assert {"per_class_ap", "pr_curves", "confusion"} <= set(sections)
    rows = re.findall(r"<tr><td>(\w+)</td><td class=num>(\d+)</td><td class=num>([\d.-]+)</td>"
                      r"<td class=num>([\d.-]+)</td><td class=num>([-+\d.]+)</td></tr>",
                      sections["per_class_ap"].html)
    want = [(n, "1", f"{a['per_class'][n]['AP'] * 100:.2f}", f"{b['per_class'][n]['AP'] * 100:.2f}",
             f"{(b['per_class'][n]['AP'] - a['per_class'][n]['AP']) * 100:+.2f}")
            for n in ("cat", "dog")]
    assert rows == want and want[1][2:] == ("100.00", "0.00", "-100.00")
    # the deployed confusion matrix: dog -> cat once; the tooltip names the cell
    assert "dog → cat: 1</title>" in sections["confusion"].html
    assert sections["pr_curves"].html.count("<svg") == 2 + 2  # overall .5/.75, one per class
    assert report_sections(work_dir=tmp_path / "nothing", summary=summary) == []
