"""The end of ``hat run``: one table (AP per predict row, Δ vs float and vs the previous row,
latency), plots and drawings. Rows and artifacts are read from the stage table and the work dir."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hatcore.workdir import DETECTIONS, LOG, WorkDir, flat_scores, read_json, write_json

if TYPE_CHECKING:
    from hatcore.pipeline import Pipeline
    from hatcore.stages import Stage


def _ran(pipe: Pipeline, stage: Stage) -> bool:
    """The stage ran in this work dir (so its recipe sections exist and name its files)."""
    return stage.enabled(pipe.recipe) and pipe.workdir.state(stage.name).is_file()


def _delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def collect(pipe: Pipeline) -> dict[str, Any]:
    """Read every predict row's results from the work dir into the summary record.

    Each row has ``AP``, ``AP50``, ``delta_AP`` (vs the first row, float),
    ``delta_prev_AP`` (vs the row before it that has results) and ``arithmetic``: what the
    scored model said it computes (its ``hat_arithmetic``, recorded in the row's metrics.json:
    ``"integer"`` for a fake-quant model evaluated with the device's integers (a quantizer's
    bit-exact option); ``"fake quant"``; None when the model does not say).
    """
    work = pipe.workdir
    rows: list[dict[str, Any]] = []
    for row in pipe.table.rows:
        path = work.predict_metrics(row)
        record = read_json(path)
        flat = flat_scores(record)
        if not flat:
            continue
        ap = flat.get("AP")
        rows.append({
            "stage": row, "AP": ap, "AP50": flat.get("AP50"),
            "arithmetic": record.get("arithmetic"),
            "delta_AP": _delta(ap, rows[0]["AP"] if rows else ap),
            "delta_prev_AP": _delta(ap, rows[-1]["AP"]) if rows else None,
            "metrics": str(path),
        })
    perf: dict[str, Any] = {}
    artifacts: dict[str, str] = {}
    for stage in pipe.table:
        if not _ran(pipe, stage):
            continue
        for name in stage.artifacts(pipe.recipe):
            p = work.stage(stage.name) / name
            if p.is_file() and name != LOG:
                artifacts[f"{stage.name}/{name}"] = str(p)
            if name == "perf.json":
                perf = read_json(p) or perf
    if work.curves.is_file():
        artifacts["curves"] = str(work.curves)
    return {
        "work_dir": str(work.root),
        "stages": rows,
        "device": {k: perf.get(k) for k in ("march", "input_shape", "latency_ms", "fps")} if perf
        else None,
        "artifacts": artifacts,
    }


def fmt_points(v: float | None, signed: bool = False) -> str:
    """A 0..1 score as COCO points (``0.8625`` -> ``86.25``); ``-`` when missing."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v * 100:+.2f}" if signed else f"{v * 100:.2f}"


def row_label(row: dict[str, Any]) -> str:
    """A row's name, marked where its model was evaluated with integer arithmetic."""
    return f"{row['stage']} (integer)" if row.get("arithmetic") == "integer" else row["stage"]


def markdown(summary: dict[str, Any]) -> str:
    lines = ["| stage | AP | AP50 | Δ AP vs float | Δ AP vs previous |",
             "|---|---:|---:|---:|---:|"]
    for r in summary["stages"]:
        lines.append(f"| {row_label(r)} | {fmt_points(r['AP'])} | {fmt_points(r['AP50'])} | "
                     f"{fmt_points(r['delta_AP'], signed=True)} | "
                     f"{fmt_points(r['delta_prev_AP'], signed=True)} |")
    out = ["# HAT run summary", "", f"work dir: `{summary['work_dir']}`", "",
           "AP in points (COCO mAP@[.5:.95] × 100).", "", *lines, ""]
    dev = summary.get("device")
    if dev and dev.get("latency_ms") is not None:
        out += [f"Estimated latency on `{dev['march']}` (a modelled device, not a measurement): "
                f"{dev['latency_ms']:.2f} ms/frame, {dev['fps']:.1f} FPS at input "
                f"{dev.get('input_shape')}.", ""]
    out += ["Artifacts:", ""] + [f"- {k}: `{v}`" for k, v in summary["artifacts"].items()]
    return "\n".join(out) + "\n"


def write(pipe: Pipeline) -> dict[str, Any]:
    summary = collect(pipe)
    write_json(pipe.workdir.summary_json, summary)
    pipe.workdir.summary_md.write_text(markdown(summary))
    return summary


def plot_curves(pipe: Pipeline) -> Path | None:
    """Loss and AP curves of the trained stages (those writing ``log.jsonl``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(11, 4))
    drew = False
    work = pipe.workdir
    for st in pipe.table:
        stage = st.name
        log = work.log(stage)
        if not _ran(pipe, st) or LOG not in st.artifacts(pipe.recipe) or not log.is_file():
            continue
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        iters = [r for r in rows if "loss" in r and r.get("kind") == "iter"]
        iters = iters or [r for r in rows if "loss" in r]  # short runs log epochs only
        if iters:
            ax_loss.plot([r.get("step", i) for i, r in enumerate(iters)],
                         [r["loss"] for r in iters], label=stage)
            drew = True
        epochs = [r for r in rows if "AP" in r]
        if epochs:
            ax_ap.plot([r.get("epoch", i) + 1 for i, r in enumerate(epochs)],
                       [r["AP"] * 100 for r in epochs], marker="o", label=stage)
    if not drew:
        plt.close(fig)
        return None
    ax_loss.set(title="training loss", xlabel="step", ylabel="loss")
    ax_ap.set(title="validation AP", xlabel="epoch", ylabel="AP (points)")
    if not ax_ap.get_lines():  # val_interval = 0: say so rather than leave the panel empty
        ax_ap.text(0.5, 0.5, "no validation during training\n(val_interval = 0):\nAP per stage "
                   "is in summary.md", ha="center", va="center", transform=ax_ap.transAxes,
                   color="0.4")
    for ax in (ax_loss, ax_ap):
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend()
    out = work.curves
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


@torch.no_grad()
def draw_examples(pipe: Pipeline, stage: str) -> list[Path]:
    """Draw the first ``predict.vis_images`` val images with ``stage``'s detections."""
    n = pipe.recipe.predict.vis_images
    if n <= 0 or not pipe.hook.draw_detections.get_hookimpls():
        return []
    model, runner = pipe.predictor(stage)
    device = pipe.predict_device(stage)
    model.to(device)
    names = list(getattr(pipe.build_dataset("val"), "class_names", []))
    paths: list[Path] = []
    for batch, dets in pipe.predictions(model, runner, pipe.loader("val"), device, "draw"):
        k = min(len(dets), n - len(paths))
        out = [pipe.workdir.drawing(stage, len(paths) + i) for i in range(k)]
        out[0].parent.mkdir(parents=True, exist_ok=True)
        sub = {key: (v[:k] if isinstance(v, (list, torch.Tensor)) else v) for key, v in batch.items()}
        if pipe.hook.draw_detections(batch=sub, detections=dets[:k], class_names=names, paths=out,
                                     score_thr=pipe.recipe.predict.vis_score_thr):
            paths += out
        if len(paths) >= n or k == 0:
            break
    return paths


def draw_comparison(pipe: Pipeline) -> list[Path]:
    """Ground truth beside the first predict row (float) and the last deployed row with results,
    on the first ``predict.vis_images`` val images: ``vis/compare/`` (``draw_comparison`` hook)."""
    n = pipe.recipe.predict.vis_images
    work = pipe.workdir
    done = [r for r in pipe.table.rows if (work.predict(r) / DETECTIONS).is_file()]
    if n <= 0 or not done:
        return []
    deployed = [r for r in done if pipe.table.scored_by(r).deployed]
    rows = list(dict.fromkeys([done[0], (deployed or done)[-1]]))
    detections = {r: read_json(work.predict(r) / DETECTIONS) or [] for r in rows}
    out = work.vis / "compare"
    if out.is_dir():
        shutil.rmtree(out)  # pictures of an earlier run would mix with these
    drawn = pipe.hook.draw_comparison(dataset=pipe.build_dataset("val"), detections=detections,
                                      out_dir=out, n=n, score_thr=pipe.recipe.predict.vis_score_thr)
    return list(drawn or [])


def table(summary: dict[str, Any]) -> str:
    """The console table."""
    head = f"{'stage':<12} {'AP':>7} {'AP50':>7} {'ΔAP':>7} {'Δprev':>7}"
    lines = [head, "-" * len(head)]
    for r in summary["stages"]:
        lines.append(f"{row_label(r):<12} {fmt_points(r['AP']):>7} {fmt_points(r['AP50']):>7} "
                     f"{fmt_points(r['delta_AP'], signed=True):>7} "
                     f"{fmt_points(r['delta_prev_AP'], signed=True):>7}")
    dev = summary.get("device")
    if dev and dev.get("latency_ms") is not None:
        lines.append(f"estimated on {dev['march']} (modelled device): {dev['latency_ms']:.2f} ms/frame,"
                     f" {dev['fps']:.1f} FPS")
    work = WorkDir(Path(summary["work_dir"]))
    lines.append(f"summary: {work.summary_md}")
    if (work.root / "report.html").is_file():
        lines.append(f"report:  {work.root / 'report.html'}")
    return "\n".join(lines)
