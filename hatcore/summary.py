"""The end of ``hat run``: one table (AP per stage, Δ vs float, latency), plots and drawings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import torch

from hatcore.data import to_device
from hatcore.pipeline import Pipeline, flat_metrics, read_json, write_json
from hatcore.recipe import PREDICT_STAGES


def collect(work: Path) -> dict[str, Any]:
    """Read every stage's results from ``work`` into the summary record."""
    rows = []
    float_ap = None
    for stage in PREDICT_STAGES:
        metrics = read_json(work / "predict" / stage / "metrics.json")
        if not isinstance(metrics, dict):
            continue
        flat = flat_metrics(metrics)
        ap = flat.get("AP")
        if stage == "float":
            float_ap = ap
        rows.append({
            "stage": stage, "AP": ap, "AP50": flat.get("AP50"),
            "delta_AP": None if ap is None or float_ap is None else ap - float_ap,
            "metrics": str(work / "predict" / stage / "metrics.json"),
        })
    perf = read_json(work / "compile" / "perf.json") or {}
    artifacts = {name: str(p) for name, p in {
        "float": work / "float" / "checkpoint-best.pt",
        "calibration": work / "calibration" / "checkpoint-best.pt",
        "qat": work / "qat" / "checkpoint-best.pt",
        "hbir": work / "export" / "model.hbir",
        "hbm": work / "compile" / "model.hbm",
        "perf": work / "compile" / "perf.json",
        "perf_html": work / "compile" / "perf.html",
        "curves": work / "vis" / "curves.png",
    }.items() if p.exists()}
    return {
        "work_dir": str(work),
        "stages": rows,
        "device": {k: perf.get(k) for k in ("march", "input_shape", "latency_ms", "fps")} if perf
        else None,
        "artifacts": artifacts,
    }


def _fmt(v: float | None, pct: bool = True, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v * 100:+.2f}" if signed else (f"{v * 100:.2f}" if pct else f"{v:.2f}")


def markdown(summary: dict[str, Any]) -> str:
    lines = ["| stage | AP | AP50 | Δ AP vs float |", "|---|---:|---:|---:|"]
    for r in summary["stages"]:
        lines.append(f"| {r['stage']} | {_fmt(r['AP'])} | {_fmt(r['AP50'])} | "
                     f"{_fmt(r['delta_AP'], signed=True)} |")
    out = ["# HAT run summary", "", f"work dir: `{summary['work_dir']}`", "",
           "AP in points (COCO mAP@[.5:.95] × 100).", "", *lines, ""]
    dev = summary.get("device")
    if dev and dev.get("latency_ms") is not None:
        out += [f"Estimated latency on `{dev['march']}` (a modelled device, not a measurement): "
                f"{dev['latency_ms']:.2f} ms/frame, {dev['fps']:.1f} FPS at input "
                f"{dev.get('input_shape')}.", ""]
    out += ["Artifacts:", ""] + [f"- {k}: `{v}`" for k, v in summary["artifacts"].items()]
    return "\n".join(out) + "\n"


def write(work: Path) -> dict[str, Any]:
    summary = collect(work)
    write_json(work / "summary.json", summary)
    (work / "summary.md").write_text(markdown(summary))
    return summary


def plot_curves(work: Path) -> Path | None:
    """Loss and AP curves of the float and qat stages from their ``log.jsonl``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(11, 4))
    drew = False
    for stage in ("float", "qat"):
        log = work / stage / "log.jsonl"
        if not log.is_file():
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
    for ax in (ax_loss, ax_ap):
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend()
    out = work / "vis" / "curves.png"
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
    deployed = stage in ("int_infer", "align_bpu")
    device = torch.device("cpu") if deployed else pipe.device
    model.to(device)
    names = list(getattr(pipe.build_dataset("val"), "class_names", []))
    paths: list[Path] = []
    for batch in pipe.loader("val"):
        batch = to_device(batch, device)
        dets = cast(Any, model).postprocess(runner(batch), batch)
        k = min(len(dets), n - len(paths))
        out = [pipe.work_dir / "vis" / f"{stage}_{len(paths) + i}.png" for i in range(k)]
        out[0].parent.mkdir(parents=True, exist_ok=True)
        sub = {key: (v[:k] if isinstance(v, (list, torch.Tensor)) else v) for key, v in batch.items()}
        if pipe.hook.draw_detections(batch=sub, detections=dets[:k], class_names=names, paths=out,
                                     score_thr=pipe.recipe.predict.vis_score_thr):
            paths += out
        if len(paths) >= n or k == 0:
            break
    return paths


def table(summary: dict[str, Any]) -> str:
    """The console table."""
    head = f"{'stage':<12} {'AP':>7} {'AP50':>7} {'ΔAP':>7}"
    lines = [head, "-" * len(head)]
    for r in summary["stages"]:
        lines.append(f"{r['stage']:<12} {_fmt(r['AP']):>7} {_fmt(r['AP50']):>7} "
                     f"{_fmt(r['delta_AP'], signed=True):>7}")
    dev = summary.get("device")
    if dev and dev.get("latency_ms") is not None:
        lines.append(f"estimated on {dev['march']} (modelled device): {dev['latency_ms']:.2f} ms/frame,"
                     f" {dev['fps']:.1f} FPS")
    lines.append(f"summary: {summary['work_dir']}/summary.md")
    return "\n".join(lines)
