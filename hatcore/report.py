"""``report.html``: one self-contained page per run, read from the work dir alone.

Written at the end of ``hat run`` and by ``hat report WORK_DIR``. No network: CSS, the small
script (sortable tables, the broken-image check) and the charts (inline SVG, ``hatcore.svg``)
are inline, pictures are base64 ``data:`` URIs. The core writes the sections it can read from
files it defines itself — the stage table (``summary.json``), the training curves
(``<stage>/log.jsonl``), the drawings (``vis/``) and the resolved recipe — and asks every plugin
for its own through the ``report_sections`` hook (per-class AP, PR curves and confusion matrix
from the metric's files; the device estimate and quantization debug from the backend's), so
nothing here knows a dataset, metric or backend.

Each section is ``<section id="sec-ID" data-section="ID">``; after the page loads, the script
fills ``#report-check`` with ``data-sections`` (their ids), ``data-images`` and ``data-broken``
(images with ``naturalWidth == 0``) so a headless browser can check the page.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

from hatcore import svg
from hatcore.summary import fmt_points, row_label
from hatcore.workdir import LOG, WorkDir, read_json

REPORT = "report.html"


@dataclass(frozen=True)
class Section:
    """One part of the report.

    :param id: a short unique name (``[a-z0-9_-]``): the anchor ``#sec-ID`` and ``data-section``.
    :param title: the heading.
    :param html: the body: trusted HTML the plugin built (escape user text with ``html.escape``).
    :param order: position (core: stages 10, curves 20, drawings 60, recipe 90); ties keep the
        plugins' order.
    """

    id: str
    title: str
    html: str
    order: int = 50




def table(head: list[str], rows: list[list[Any]], *, sortable: bool = True,
          numeric_from: int = 1, cls: str = "") -> str:
    """An HTML table; cells are escaped; columns from ``numeric_from`` on are right-aligned.
    A sortable table sorts on a click on its header (numbers as numbers)."""
    th = "".join(f"<th{' class=num' if i >= numeric_from else ''}>{escape(str(h))}</th>"
                 for i, h in enumerate(head))
    body = "".join(
        "<tr>" + "".join(f"<td{' class=num' if i >= numeric_from else ''}>{escape(str(c))}</td>"
                         for i, c in enumerate(r)) + "</tr>" for r in rows)
    attrs = " ".join(x for x in (("class='sortable " + cls + "'") if sortable else
                                 (f"class='{cls}'" if cls else ""),) if x)
    return f"<table {attrs}><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def image_tag(path: Path, alt: str, max_width: int | None = None) -> str:
    """``path`` (PNG/JPEG/SVG) inline as a ``data:`` URI."""
    mime = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
            ".svg": "image/svg+xml"}.get(path.suffix.lower(), "application/octet-stream")
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    style = f" style='max-width:{max_width}px'" if max_width else ""
    return f"<img alt='{escape(alt)}' src='data:{mime};base64,{data}'{style}>"


# --------------------------------------------------------------------------- the core's sections


def _stages(summary: dict[str, Any]) -> Section:
    rows = []
    for r in summary.get("stages", []):
        rows.append([row_label(r), fmt_points(r.get("AP")),
                     fmt_points(r.get("AP50")), fmt_points(r.get("delta_AP"), signed=True),
                     fmt_points(r.get("delta_prev_AP"), signed=True)])
    body = table(["stage", "AP", "AP50", "Δ AP vs float", "Δ AP vs previous"], rows)
    body = "<p>AP in points (COCO mAP@[.5:.95] × 100) on the validation set.</p>" + body
    dev = summary.get("device")
    if dev and dev.get("latency_ms") is not None:
        body += (f"<p>Estimated latency on <b>{escape(str(dev.get('march')))}</b> (a modelled "
                 f"device, not a measurement): <b>{dev['latency_ms']:.3f} ms/frame</b>, "
                 f"{dev.get('fps', 0):.1f} FPS at input {escape(str(dev.get('input_shape')))}."
                 "</p>")
    if not rows:
        body += "<p class=note>No predict row has results yet (`hat run` scores them).</p>"
    return Section("stages", "Stages", body, 10)


def _log_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    return rows


def _curves(work: WorkDir, stages: list[str]) -> Section:
    loss, lr, ap = [], [], []
    for stage in stages:
        log = work.log(stage)
        if not log.is_file():
            continue
        rows = _log_rows(log)
        iters = [r for r in rows if r.get("kind") == "iter" and "loss" in r]
        epochs = [r for r in rows if r.get("kind") == "epoch"]
        if iters:
            loss.append((stage, [r["step"] for r in iters], [r["loss"] for r in iters]))
            lr.append((stage, [r["step"] for r in iters], [r["lr"] for r in iters]))
        elif epochs:  # short runs log epochs only: x = epoch
            loss.append((f"{stage} (per epoch)", [r["epoch"] + 1 for r in epochs],
                         [r.get("loss", math.nan) for r in epochs]))
            lr.append((f"{stage} (per epoch)", [r["epoch"] + 1 for r in epochs],
                       [r.get("lr", math.nan) for r in epochs]))
        scored = [r for r in epochs if "AP" in r]
        if scored:
            ap.append((stage, [r["epoch"] + 1 for r in scored], [r["AP"] * 100 for r in scored]))
    if not loss:
        return Section("curves", "Training curves",
                       "<p class=note>No training log (log.jsonl) in this work dir.</p>", 20)
    x = "step" if not any("per epoch" in s[0] for s in loss) else "step (or epoch)"
    parts = [svg.line_chart(loss, title="training loss", xlabel=x, ylabel="loss"),
             svg.line_chart(lr, title="learning rate", xlabel=x, ylabel="lr")]
    if ap:
        parts.append(svg.line_chart(ap, title="validation AP during training", xlabel="epoch",
                                    ylabel="AP (points)", markers=True))
        note = ""
    else:
        note = ("<p class=note>No validation during training (<code>val_interval = 0</code>): "
                "the AP of each stage is in the stage table.</p>")
    return Section("curves", "Training curves", "<div class=row>" + "".join(parts) + "</div>"
                   + note, 20)


def _drawings(work: WorkDir) -> Section:
    compare = sorted(p for p in (work.vis / "compare").glob("*") if p.suffix in (".png", ".jpg"))
    # one stage's detections alone (vis/<row>_<i>.png): only when there is no comparison, which
    # shows the same images with the ground truth (and keeps the page a few hundred KB)
    single = [] if compare else sorted(p for p in work.vis.glob("*.png") if p != work.curves)
    parts = []
    if compare:
        parts.append("<p>Ground truth (left) and each model's detections on the same original "
                     "images: the float model and the deployed one.</p>")
        parts += [f"<figure>{image_tag(p, f'comparison {p.stem}')}"
                  f"<figcaption>image {escape(p.stem)}</figcaption></figure>" for p in compare]
    if single:
        parts.append("<div class=row>" + "".join(
            f"<figure>{image_tag(p, p.stem, 420)}<figcaption>{escape(p.stem)}</figcaption>"
            "</figure>" for p in single) + "</div>")
    if not parts:
        parts = ["<p class=note>No drawings in vis/ (<code>predict.vis_images = 0</code>, or no "
                 "plugin draws this dataset).</p>"]
    return Section("drawings", "Drawings", "".join(parts), 60)


def _recipe(work: WorkDir) -> Section:
    resolved = read_json(work.resolved)
    parts = []
    if resolved is not None:
        parts.append(f"<p>Source <code>{escape(str(resolved.get('source')))}</code>"
                     + (f", overrides <code>{escape(' '.join(resolved['overrides']))}</code>"
                        if resolved.get("overrides") else "") + "; every default filled in:</p>")
        parts.append(f"<pre>{escape(json.dumps(resolved.get('recipe'), indent=2))}</pre>")
    if work.recipe.is_file():
        parts.append(f"<details><summary>recipe.toml as written</summary><pre>"
                     f"{escape(work.recipe.read_text())}</pre></details>")
    return Section("recipe", "Resolved recipe",
                   "".join(parts) or "<p class=note>No recipe in this work dir.</p>", 90)


def core_sections(work: WorkDir, summary: dict[str, Any]) -> list[Section]:
    """The sections the core reads from its own files."""
    order = {r["stage"]: i for i, r in enumerate(summary.get("stages", []))}
    trained = sorted({p.parent.name for p in work.root.glob(f"*/{LOG}")},
                     key=lambda s: (order.get(s, len(order)), s))
    return [_stages(summary), _curves(work, trained), _drawings(work), _recipe(work)]


# --------------------------------------------------------------------------- the page

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#1f3a5f;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}
nav{position:sticky;top:0;background:#fff;border-bottom:1px solid #ddd;padding:6px 24px;z-index:2}
nav a{margin-right:14px;color:#1f5fa8;text-decoration:none}
main{padding:8px 24px 40px}section{background:#fff;border:1px solid #e2e2e2;border-radius:6px;
margin:14px 0;padding:6px 16px 14px}h2{font-size:17px;margin:10px 0}
table{border-collapse:collapse;margin:6px 0;font-size:13px}td,th{padding:3px 9px;
border-bottom:1px solid #eee;text-align:left}th{background:#f2f4f7}
.scroll th{position:sticky;top:0;z-index:1}
.num{text-align:right;font-variant-numeric:tabular-nums}
table.sortable th{cursor:pointer}table.sortable th:after{content:' \\2195';color:#aaa}
.row{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
figure{margin:8px 0}figure img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:12px;color:#666}.note{color:#666}
pre{background:#f6f8fa;padding:8px;overflow:auto;max-height:420px;font-size:12px}
.scroll{max-height:460px;overflow:auto}details{margin:6px 0}
"""

JS = """
function sortTable(th){const t=th.closest('table'),b=t.tBodies[0],i=[...th.parentNode.children].indexOf(th);
const asc=th.dataset.asc!=='1';th.dataset.asc=asc?'1':'0';const rows=[...b.rows];
const key=r=>{const s=r.cells[i].textContent.trim(),n=parseFloat(s.replace(/[^0-9eE+.-]/g,''));
return isNaN(n)?s:n};rows.sort((x,y)=>{const a=key(x),c=key(y);
const r=(typeof a==='number'&&typeof c==='number')?a-c:String(a).localeCompare(String(c));
return asc?r:-r});rows.forEach(r=>b.appendChild(r));}
document.querySelectorAll('table.sortable th').forEach(th=>th.addEventListener('click',()=>sortTable(th)));
window.addEventListener('load',()=>{const imgs=[...document.images];
const bad=imgs.filter(i=>!i.complete||i.naturalWidth===0);const m=document.getElementById('report-check');
m.dataset.images=imgs.length;m.dataset.broken=bad.length;m.dataset.brokenAlt=bad.map(i=>i.alt).join('|');
m.dataset.svgs=document.querySelectorAll('svg').length;
m.dataset.sections=[...document.querySelectorAll('section[data-section]')].map(s=>s.dataset.section).join(',');
m.dataset.ready='1';});
"""


def render(title: str, sections: list[Section]) -> str:
    """The whole page."""
    ordered = sorted(sections, key=lambda s: s.order)
    nav = "".join(f"<a href='#sec-{escape(s.id)}'>{escape(s.title)}</a>" for s in ordered)
    body = "".join(f"<section id='sec-{escape(s.id)}' data-section='{escape(s.id)}'>"
                   f"<h2>{escape(s.title)}</h2>{s.html}</section>" for s in ordered)
    return (f"<!doctype html><html lang=en><head><meta charset='utf-8'><title>"
            f"{escape(title)}</title><meta name=viewport content='width=device-width'>"
            f"<style>{CSS}</style></head><body><header><h1>{escape(title)}</h1></header>"
            f"<nav>{nav}</nav><main>{body}</main><div id='report-check' hidden></div>"
            f"<script>{JS}</script></body></html>")


def write(work_dir: Path, hook: Any) -> Path:
    """Write ``WORK_DIR/report.html`` from the work dir's files and the plugins' sections.

    :param hook: the plugin manager's hook relay (``report_sections``).
    """
    work = WorkDir(Path(work_dir))
    summary = read_json(work.summary_json) or {"work_dir": str(work.root), "stages": []}
    sections = core_sections(work, summary)
    for found in hook.report_sections(work_dir=work.root, summary=summary):
        sections += list(found or [])
    ids = [s.id for s in sections]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise ValueError(f"report sections with the same id: {sorted(dup)}")
    name = (read_json(work.resolved) or {}).get("recipe", {}).get("task", {}).get("name")
    out = work.root / REPORT
    tmp = out.with_suffix(".html.tmp")
    tmp.write_text(render(f"HAT run report — {name or work.root.name}", sections))
    tmp.replace(out)
    return out
