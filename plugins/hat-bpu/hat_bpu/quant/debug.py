"""Per-layer quantization debugging: where does the fake-quant model drift from float?

For every quantized op's output (fused conv, add, concat, requantize, input quantizer) the
float model's value ``f`` and the fake-quant model's value ``q`` are compared on the same
inputs. The error is cumulative (each layer sees the quantized layers before it), as in
Horizon's own debug tool:

* ``cosine``: cosine similarity of ``f`` and ``q`` (1 = same direction);
* ``sqnr_db``: ``10·log10(Σf² / Σ(f - q)²)``;
* ``max_err_lsb``: ``max|f - q| / scale`` (the layer's output scale);
* ``used_lsb``: the 99.9th percentile of ``|f| / scale``: below 8 the layer uses only a few
  integer levels (``range`` flag: its range is too large for int8 - try int16);
* ``clipped``: fraction of ``|f| > qmax·scale`` (``clip`` flag when above 0.1%).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hat_bpu.quant import qspec
from hat_bpu.quant.fake_quant import ActFQ, QAct, QAdd, QCat, QConv2d, QScale, fake_quant_weight
from hat_bpu.quant.prepare import QuantModel
from hatcore import quant
from hatcore.errors import UserError

QUANT_OPS = (QConv2d, QAdd, QCat, QAct, QScale, ActFQ)


def _quant_layers(model: QuantModel) -> dict[str, nn.Module]:
    """Top-level quantized ops of the graph (their output quantizer is the last thing they do)."""
    layers = {}
    for n in model.qgraph.graph.nodes:
        if n.op == "call_module":
            m = model.qgraph.get_submodule(str(n.target))
            if isinstance(m, QUANT_OPS):
                layers[str(n.target)] = m
    return layers


def _out_fq(m: nn.Module) -> ActFQ | None:
    return m if isinstance(m, ActFQ) else getattr(m, "out_fq", None)


def _set_mode_all(model: nn.Module, mode: str) -> None:
    for m in model.modules():
        fn = getattr(m, "hat_set_mode", None)
        if callable(fn):
            fn(mode)


@torch.no_grad()
def _capture(model: QuantModel, layers: dict[str, nn.Module], inputs: list[torch.Tensor],
             mode: str) -> dict[str, list[torch.Tensor]]:
    out: dict[str, list[torch.Tensor]] = {k: [] for k in layers}
    hooks = [m.register_forward_hook(lambda _m, _i, o, k=k: out[k].append(o.detach().float().cpu()))
             for k, m in layers.items()]
    _set_mode_all(model, mode)
    try:
        for x in inputs:
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return out


def compare_layers(model: QuantModel, inputs: list[torch.Tensor], integer: bool = False
                   ) -> list[dict[str, Any]]:
    """Float vs fake-quant statistics of every quantized layer, worst (lowest SQNR) first.

    :param model: a calibrated / QAT model from the ``quantize`` hook (left in fake_quant mode).
    :param inputs: model inputs, e.g. ``Tensor[N, 3, H, W]`` batches.
    :param integer: also convert the model and run its integer graph
        (:mod:`hat_bpu.ir_reference`): ``int_max_err_lsb`` and ``int_identical`` compare each
        layer's integer output with its fake-quant output.
    """
    was_training = model.training
    model.eval()
    layers = _quant_layers(model)
    try:
        ref = _capture(model, layers, inputs, "float")
        got = _capture(model, layers, inputs, "fake_quant")
    finally:
        quant.set_mode(model, "fake_quant")
        model.train(was_training)
    rows = []
    for order, (name, m) in enumerate(layers.items()):
        if not ref[name]:
            continue
        f = torch.cat([t.flatten() for t in ref[name]]).double()
        q = torch.cat([t.flatten() for t in got[name]]).double()
        fq = _out_fq(m)
        scale = float(fq.scale) if fq is not None else float("nan")
        qmin, qmax = (fq.qmin, fq.qmax) if fq is not None else (-128, 127)
        err = (f - q).abs()
        noise = float((err**2).sum())
        rows.append({
            "layer": name, "order": order, "type": type(m).__name__,
            "dtype": fq.dtype if fq is not None else "float", "scale": scale,
            "observer": fq.observer.choice if fq is not None and fq.observer is not None
            else "fixed",
            "cosine": float(torch.nn.functional.cosine_similarity(f, q, dim=0)),
            "sqnr_db": 10 * torch.log10(torch.tensor((f**2).sum().item() / max(noise, 1e-30)))
            .item(),
            "max_err_lsb": float(err.max() / scale),
            "used_lsb": float(torch.quantile(f.abs()[:1_000_000], 0.999) / scale),
            "clipped": float(((f > (qmax + 0.5) * scale) | (f < (qmin - 0.5) * scale)).double().mean()),
        })
    if integer:
        _integer_columns(model, inputs, got, rows)
    for r in rows:
        m = layers[r["layer"]]
        r["bias_overflow"] = _bias_overflow(m) if isinstance(m, QConv2d) else 0
    for r in rows:
        r["flags"] = ([f"range ({r['used_lsb']:.1f} LSB used; try int16)"]
                      if r["used_lsb"] < 8 and r["dtype"] == "int8" else []) + (
                      [f"clip ({100 * r['clipped']:.2f}% clipped)"] if r["clipped"] > 1e-3 else []) + (
                      [f"bias ({r['bias_overflow']} ch saturate int32)"] if r["bias_overflow"] else [])
    return sorted(rows, key=lambda r: r["sqnr_db"])


def _bias_overflow(m: QConv2d) -> int:
    """Output channels whose int32 bias saturates (the input's scale is tiny next to the bias)."""
    s_in = m.input_scale()
    if s_in is None or m.out_fq is None:
        return 0
    w, b = m.folded()
    _, w_scale = fake_quant_weight(w.detach(), "int8", m.pow2)
    return qspec.bias_overflows(b.detach().cpu().numpy(), float(s_in), w_scale.cpu().numpy())


def _integer_columns(model: QuantModel, inputs: list[torch.Tensor],
                     got: dict[str, list[torch.Tensor]], rows: list[dict[str, Any]]) -> None:
    from hat_bpu.ir.reference import run_ir
    from hat_bpu.quant.convert import convert

    graph = convert(model, inputs[0][:1])
    env: dict[str, Any] = {}
    run_ir(graph, torch.cat(inputs).numpy(), env)
    by_name = {n.name: n for n in graph.nodes}
    for r in rows:
        node = by_name.get(r["layer"])
        fq = torch.cat([t.flatten() for t in got[r["layer"]]]).double()
        if node is None or env[node.outputs[0]].size != fq.numel():
            continue  # a shared conv (several calls) or no integer counterpart
        t = graph.tensors[node.outputs[0]]
        err = (torch.from_numpy(env[node.outputs[0]]).flatten().double() * t.scale - fq).abs()
        r["int_max_err_lsb"] = float(err.max() / t.scale)
        r["int_identical"] = float((err < 0.5 * t.scale).double().mean())


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width text table of :func:`compare_layers` rows."""
    integer = any("int_identical" in r for r in rows)
    head = (f"{'layer':<40} {'type':<8} {'dtype':<6} {'observer':<10} {'cosine':>8} "
            f"{'SQNR dB':>8} {'max LSB':>8}"
            + (f" {'int=fq %':>8} {'int LSB':>7}" if integer else "") + "  flags")
    lines = [head, "-" * len(head)]
    for r in rows:
        ints = ""
        if integer:
            ints = (f" {100 * r['int_identical']:>8.3f} {r['int_max_err_lsb']:>7.2f}"
                    if "int_identical" in r else f" {'-':>8} {'-':>7}")
        lines.append(f"{r['layer'][:40]:<40} {r['type'][:8]:<8} {r['dtype']:<6} "
                     f"{r['observer'][:10]:<10} "
                     f"{r['cosine']:>8.5f} {r['sqnr_db']:>8.2f} {r['max_err_lsb']:>8.2f}{ints}  "
                     f"{'; '.join(r['flags'])}")
    return "\n".join(lines)


def write_report(rows: list[dict[str, Any]], out_dir: Path) -> dict[str, Path]:
    """``quant_debug.json``, ``quant_debug.txt`` and ``quant_debug.png`` (SQNR per layer)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "quant_debug.json", "txt": out_dir / "quant_debug.txt",
             "png": out_dir / "quant_debug.png"}
    paths["json"].write_text(json.dumps({"version": 1, "layers": rows}, indent=1))
    paths["txt"].write_text(format_table(rows) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional
        del paths["png"]
        return paths
    by_order = sorted(rows, key=lambda r: r["order"])
    fig, ax = plt.subplots(figsize=(max(6, 0.18 * len(by_order)), 4))
    colors = ["tab:red" if r["flags"] else "tab:blue" for r in by_order]
    ax.bar(range(len(by_order)), [r["sqnr_db"] for r in by_order], color=colors)
    ax.set_xticks(range(len(by_order)), [r["layer"] for r in by_order], rotation=90,
                  fontsize=6 if len(by_order) > 40 else 8)
    ax.set_ylabel("SQNR float vs fake quant (dB)")
    ax.set_title("per-layer quantization error (red: flagged)")
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=100)
    plt.close(fig)
    return paths


def debug_recipe(recipe: Path, stage: str, batches: int, out: Path | None,
                 overrides: tuple[str, ...] = (), integer: bool = False) -> str:
    """``hat quant-debug``: load the stage's checkpoint, compare on val batches, write reports."""
    from hatcore.pipeline import Pipeline

    pipe = Pipeline.load(recipe, overrides)
    model = pipe.load_stage_model(stage).cpu().eval()
    if not isinstance(model, QuantModel):
        raise UserError(f"the {stage} model of {recipe} is not a hat-bpu quantized model")
    inputs = []
    for i, batch in enumerate(pipe.loader("val")):
        if i >= batches:
            break
        inputs.append(batch["img"])
    rows = compare_layers(model, inputs, integer)
    paths = write_report(rows, out or pipe.work_dir / "quant_debug" / stage)
    return format_table(rows) + "\n\n" + "\n".join(f"wrote {p}" for p in paths.values())
