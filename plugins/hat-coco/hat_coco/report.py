"""hat-coco's sections of ``report.html`` (``report_sections`` hook): per-class AP of every
predict row, PR curves at IoU .5 and .75 (overall and per class) and the confusion matrices,
all read from ``predict/<row>/analysis.json`` (:mod:`hat_coco.analysis`)."""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any

from hatcore import svg
from hatcore.report import Section, fmt_points, table

ANALYSIS = "analysis.json"
PER_CLASS_CHARTS = 40
"""Classes beyond this many get no PR chart of their own (the table still lists them all)."""


def _load(work_dir: Path, summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for r in summary.get("stages", []):
        path = Path(work_dir) / "predict" / r["stage"] / ANALYSIS
        try:
            found[r["stage"]] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
    return found


def sections(work_dir: Path, summary: dict[str, Any]) -> list[Section]:
    """The three sections, or ``[]`` when no predict row wrote ``analysis.json``."""
    found = _load(work_dir, summary)
    if not found:
        return []
    return [per_class_ap(found), pr_curves(found), confusion(found)]


def per_class_ap(found: dict[str, dict[str, Any]]) -> Section:
    rows = list(found)
    classes = next(iter(found.values()))["classes"]
    body = []
    for name in classes:
        first = found[rows[0]]["per_class"].get(name, {})
        cells = [name, first.get("gt", 0)]
        aps = [found[r]["per_class"].get(name, {}).get("AP") for r in rows]
        cells += [fmt_points(a) for a in aps]
        if len(rows) > 1:
            delta = None if aps[0] is None or aps[-1] is None else aps[-1] - aps[0]
            cells.append(fmt_points(delta, signed=True))
        body.append(cells)
    head = ["class", "GT boxes", *[f"AP {r}" for r in rows]]
    if len(rows) > 1:
        head.append(f"Δ {rows[-1]} vs {rows[0]}")
    note = ("<p>COCO AP@[.5:.95] per class in points, from COCOeval's precision array (area "
            "all, 100 detections per image); '-' for a class without ground truth. Click a "
            "header to sort.</p>")
    return Section("per_class_ap", "Per-class AP", note + "<div class=scroll>"
                   + table(head, body) + "</div>", 30)


def pr_curves(found: dict[str, dict[str, Any]]) -> Section:
    rows = list(found)
    any_a = next(iter(found.values()))
    recall = any_a["pr"]["recall"]
    overall = []
    for key, iou in (("iou50", ".5"), ("iou75", ".75")):
        series = [(r, recall, found[r]["pr"][key].get("all") or []) for r in rows]
        overall.append(svg.line_chart(series, title=f"all classes, IoU {iou}", xlabel="recall",
                                      ylabel="precision", ylim=(0, 1)))
    pick = [rows[0], rows[-1]] if len(rows) > 1 else rows
    charts = []
    classes = any_a["classes"]
    for name in classes[:PER_CLASS_CHARTS]:
        series = [(f"{r} @{iou}", recall, found[r]["pr"][key].get(name) or [])
                  for r in pick for key, iou in (("iou50", ".5"), ("iou75", ".75"))]
        charts.append(svg.line_chart(series, title=name, xlabel="recall", ylabel="precision",
                                     ylim=(0, 1), width=340, height=220))
    more = (f"<p class=note>{len(classes) - PER_CLASS_CHARTS} more classes: their AP is in the "
            "table above.</p>" if len(classes) > PER_CLASS_CHARTS else "")
    return Section("pr_curves", "Precision-recall curves",
                   "<p>Interpolated precision at 101 recall points (COCOeval), averaged over "
                   "classes for 'all classes'.</p><div class=row>" + "".join(overall)
                   + f"</div><details open><summary>per class ({escape(' and '.join(pick))}, "
                   f"IoU .5 and .75)</summary><div class=row>{''.join(charts)}</div>{more}"
                   "</details>", 40)


def confusion(found: dict[str, dict[str, Any]]) -> Section:
    rows = list(found)
    pick = [rows[0], rows[-1]] if len(rows) > 1 else rows
    maps = []
    conf = {}
    for r in pick:
        conf = found[r]["confusion"]
        labels = conf["labels"]
        maps.append(svg.heatmap(labels, labels, conf["matrix"], title=r,
                                xlabel="predicted", ylabel="ground truth"))
    text = (f"<p>Ground-truth boxes (rows) matched to detections with score ≥ "
            f"{conf.get('score_thr', 0):g} (columns) at IoU ≥ {conf.get('iou_thr', 0):g}, any "
            "class, greedily by IoU. The background column counts missed boxes, the background "
            "row false alarms. Colour: count / row maximum; hover a cell for its count.</p>")
    return Section("confusion", "Confusion matrix", text + "<div class=row>" + "".join(maps)
                   + "</div>", 50)
