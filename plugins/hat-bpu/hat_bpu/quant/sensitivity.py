"""Per-layer sensitivity: which quantized layer costs accuracy on its own, and what int16 buys.

``hat quant-debug``'s similarity table is cumulative (each layer sees every quantized layer
before it). Here each *unit* — a fused conv block (all call sites of a shared conv together,
as ``overrides`` names them) or a functional op (``_hat_q.add_1``) — is measured in isolation,
on a calibrated model, by switching the fake-quant modules' modes and dtypes in place (no
recalibration):

* ``alone``: only this unit quantized (its int8 weights, its output quantizer; its input
  rounded to its input scale), every other op float;
* ``int16``: every unit quantized in **int8** except this one, whose output is int16 at the same
  range (``amax = scale · qmax``): what int16 buys here — the gain the precision search uses;
* ``float_rest`` (the float reverse, on by default): every unit quantized as the recipe says
  except this one, left float: what removing this unit's quantization entirely buys, with the
  error of every other layer present (the complement of ``alone``).

The score of a configuration is the output SQNR against the float model (``sqnr``: mean over the
model's raw output tensors of ``10·log10(Σf² / Σ(f − q)²)`` on ``batches`` validation batches) or
the validation AP (``ap``: the recipe's metric on the whole validation set; slow). Results are
cached per unit in ``sensitivity.json`` under a key of the checkpoint, the quantizer settings
and the metric, so a rerun only measures what is missing (a row measured without the float
reverse gets only that column when it is asked for).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from hat_bpu.quant.debug import _quant_layers
from hat_bpu.quant.fake_quant import ActFQ
from hat_bpu.quant.prepare import QuantModel
from hat_bpu.quant.qspec import qrange, scale_from_amax
from hatcore import quant

Score = Callable[[QuantModel], float]


def unit_name(layer: str) -> str:
    """The ``overrides`` name of a quantized layer: a shared conv's ``name@1`` is ``name``."""
    return layer.split("@", 1)[0]


def units(model: QuantModel) -> dict[str, list[nn.Module]]:
    """``{unit name: [its quantized modules]}`` in graph order (see the module docstring)."""
    out: dict[str, list[nn.Module]] = {}
    for name, m in _quant_layers(model).items():
        out.setdefault(unit_name(name), []).append(m)
    return out


def out_quantizers(mods: list[nn.Module]) -> list[ActFQ]:
    """The output quantizers of a unit's modules (a standalone quantizer is its own)."""
    fqs = [m if isinstance(m, ActFQ) else getattr(m, "out_fq", None) for m in mods]
    return [q for q in fqs if q is not None]


def can_int16(mods: list[nn.Module]) -> bool:
    """True when ``overrides`` can make this unit int16: it computes its own output scale (a
    fused conv or a functional op), not the fixed-scale input quantizer."""
    fqs = out_quantizers(mods)
    return bool(fqs) and not any(q.fixed for q in fqs) and not all(isinstance(m, ActFQ)
                                                                  for m in mods)


def _set_unit_mode(mods: list[nn.Module], mode: str) -> None:
    for m in mods:
        for sub in m.modules():
            fn = getattr(sub, "hat_set_mode", None)
            if callable(fn):
                fn(mode)


@contextmanager
def _as_dtype(fqs: list[ActFQ], dtype: str) -> Iterator[None]:
    """Quantizers ``fqs`` temporarily in ``dtype`` at the same range (``amax = scale · qmax``)."""
    saved = [(q.dtype, q.qmin, q.qmax, q.scale.detach().clone()) for q in fqs]
    try:
        with torch.no_grad():
            for q in fqs:
                if q.dtype == dtype or q.fixed:
                    continue
                amax = q.scale.detach() * q.qmax
                q.dtype, (q.qmin, q.qmax) = dtype, qrange(dtype)
                q.scale.copy_(scale_from_amax(amax, dtype, q.pow2))
        yield
    finally:
        with torch.no_grad():
            for q, (dt, lo, hi, sc) in zip(fqs, saved, strict=True):
                q.dtype, q.qmin, q.qmax = dt, lo, hi
                q.scale.copy_(sc)


@contextmanager
def configured(model: QuantModel, quantized: set[str] | None, int16: set[str] = frozenset(),  # type: ignore[assignment]
               int8_rest: bool = False) -> Iterator[None]:
    """``model`` with only the units ``quantized`` in fake quant (None: all), those in
    ``int16`` int16, and with ``int8_rest`` every other unit int8. Modes, dtypes and scales are
    restored afterwards."""
    groups = units(model)
    before = [(m, m.mode) for m in model.modules()
              if isinstance(getattr(m, "mode", None), str) and callable(getattr(m, "hat_set_mode",
                                                                                None))]
    _set_unit_mode([model], "float")  # the fresh "float" mode (not a hatcore.quant.set_mode mode)
    for name, mods in groups.items():
        if quantized is None or name in quantized:
            _set_unit_mode(mods, "fake_quant")
    to16 = [q for n in int16 for q in out_quantizers(groups[n])]
    to8 = [q for n, mods in groups.items() if int8_rest and n not in int16
           for q in out_quantizers(mods)]
    try:
        with _as_dtype(to16, "int16"), _as_dtype(to8, "int8"):
            yield
    finally:
        for m, mode in before:  # nested configurations restore what they found
            if m.mode != mode:
                m.hat_set_mode(mode)


# --------------------------------------------------------------------------- scores


def _leaves(out: Any) -> list[torch.Tensor]:
    return [t.detach().double() for t in pytree.tree_leaves(out)
            if isinstance(t, torch.Tensor) and t.is_floating_point()]


def sqnr_db(ref: list[list[torch.Tensor]], got: list[list[torch.Tensor]]) -> float:
    """Mean over output tensors of ``10·log10(Σf² / Σ(f − q)²)``, summed over the batches."""
    vals = []
    for k in range(len(ref[0])):
        sig = sum(float((r[k] ** 2).sum()) for r in ref)
        noise = sum(float(((r[k] - g[k]) ** 2).sum()) for r, g in zip(ref, got, strict=True))
        vals.append(10 * torch.log10(torch.tensor(max(sig, 1e-30) / max(noise, 1e-30))).item())
    return sum(vals) / len(vals)


def sqnr_score(inputs: list[torch.Tensor]) -> Score:
    """A score: output SQNR of the model as configured against its float outputs on ``inputs``."""
    cache: dict[int, list[list[torch.Tensor]]] = {}

    @torch.no_grad()
    def run(model: QuantModel) -> list[list[torch.Tensor]]:
        return [_leaves(model(x)) for x in inputs]

    def score(model: QuantModel) -> float:
        if id(model) not in cache:
            with configured(model, set()):
                cache[id(model)] = run(model)
        return sqnr_db(cache[id(model)], run(model))

    return score


# --------------------------------------------------------------------------- the report


def _key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sensitivity(model: QuantModel, score: Score, cache: Path | None = None,
                key: dict[str, Any] | None = None, progress: Callable[[str], None] | None = None,
                float_reverse: bool = True) -> dict[str, Any]:
    """Measure every unit (see the module docstring); returns the report record.

    :param score: higher is better (SQNR dB, or AP).
    :param cache: ``sensitivity.json``; rows measured under the same ``key`` are reused.
    :param float_reverse: also measure ``float_rest`` per unit (one more score per unit).
    :returns: ``{"key", "float", "quantized", "int8", "units": [rows]}``; a row has ``unit``,
        ``order``, ``dtype`` (as the recipe quantizes it), ``alone`` (score with only it
        quantized), ``alone_loss`` (float score − alone), ``int16`` (all int8 but it int16;
        None where it cannot be int16), ``int16_gain`` (int16 − the all-int8 score) and, with
        ``float_reverse`` (or from the cache), ``float_rest`` (everything quantized as the recipe
        says but this unit, float) and ``float_gain`` (float_rest − the quantized score). Rows
        are sorted by ``alone_loss``, largest first.
    """
    was_training = model.training
    model.eval()
    k = _key(key or {})
    old: dict[str, Any] = {}
    if cache is not None and cache.is_file():
        rec = json.loads(cache.read_text())
        if rec.get("key") == k:
            old = rec
    done = {r["unit"]: r for r in old.get("units", [])}
    groups = units(model)
    try:
        base = {}
        for what, kw in (("float", {"quantized": set()}), ("quantized", {"quantized": None}),
                         ("int8", {"quantized": None, "int8_rest": True})):
            if what in old:
                base[what] = old[what]
                continue
            with configured(model, **kw):  # type: ignore[arg-type]
                base[what] = score(model)
        rows = []
        for order, (name, mods) in enumerate(groups.items()):
            row = done.get(name)
            fresh = row is None or (float_reverse and "float_rest" not in row)
            if row is None:
                if progress:
                    progress(name)
                with configured(model, {name}):
                    alone = score(model)
                int16 = None
                if can_int16(mods):
                    with configured(model, None, {name}, int8_rest=True):
                        int16 = score(model)
                fq = out_quantizers(mods)
                row = {"unit": name, "order": order, "type": type(mods[0]).__name__,
                       "dtype": fq[0].dtype if fq else "float", "calls": len(mods),
                       "alone": alone, "alone_loss": base["float"] - alone, "int16": int16,
                       "int16_gain": None if int16 is None else int16 - base["int8"]}
            if float_reverse and "float_rest" not in row:
                if progress and name in done:
                    progress(f"{name} (float reverse)")
                with configured(model, set(groups) - {name}):
                    row["float_rest"] = score(model)
                row["float_gain"] = row["float_rest"] - base["quantized"]
            rows.append(row)
            if cache is not None and fresh:  # partial results survive an interruption
                _write(cache, {"key": k, **base, "units": [*rows, *(
                    r for n, r in done.items() if n not in {x["unit"] for x in rows})]})
    finally:
        quant.set_mode(model, "fake_quant")
        model.train(was_training)
    rows.sort(key=lambda r: -r["alone_loss"])
    record = {"key": k, **base, "units": rows}
    if cache is not None:
        _write(cache, record)
    return record


def _write(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)


def format_sensitivity(record: dict[str, Any], metric: str, top: int | None = None) -> str:
    """The sorted table: most damaging alone first, with what int16 buys."""
    unit = "dB" if metric == "sqnr" else "AP"
    mul = 1.0 if metric == "sqnr" else 100.0
    fr = any("float_gain" in r for r in record["units"])
    head = (f"{'unit':<44} {'type':<8} {'dtype':<6} {'alone ' + unit:>10} {'loss':>8} "
            f"{'int16 gain':>10}" + (f" {'float gain':>10}" if fr else ""))
    flt = "inf (noise floor 1e-30)" if metric == "sqnr" else f"{mul * record['float']:.2f}"
    lines = [f"{metric}: float {flt}, as quantized "
             f"{mul * record['quantized']:.2f}, all int8 {mul * record['int8']:.2f}", head,
             "-" * len(head)]
    for r in record["units"][:top]:
        gain = "-" if r["int16_gain"] is None else f"{mul * r['int16_gain']:+.3f}"
        loss = "-" if metric == "sqnr" else f"{mul * r['alone_loss']:.3f}"  # vs inf: no number
        lines.append(f"{r['unit'][:44]:<44} {r['type'][:8]:<8} {r['dtype']:<6} "
                     f"{mul * r['alone']:>10.2f} {loss:>8} {gain:>10}"
                     + ((f" {mul * r['float_gain']:>+10.3f}" if "float_gain" in r
                         else f" {'-':>10}") if fr else ""))
    return "\n".join(lines)


def write_sensitivity(record: dict[str, Any], metric: str, out_dir: Path) -> dict[str, Path]:
    """``sensitivity.txt`` and ``sensitivity.png`` beside the cached ``sensitivity.json``."""
    paths = {"json": out_dir / "sensitivity.json", "txt": out_dir / "sensitivity.txt",
             "png": out_dir / "sensitivity.png"}
    out_dir.mkdir(parents=True, exist_ok=True)
    paths["txt"].write_text(format_sensitivity(record, metric) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        del paths["png"]
        return paths
    rows = sorted(record["units"], key=lambda r: r["order"])
    mul = 1.0 if metric == "sqnr" else 100.0
    fig, ax = plt.subplots(figsize=(max(6, 0.16 * len(rows)), 4))
    xs = range(len(rows))
    ax.bar(xs, [mul * r["alone_loss"] for r in rows], color="tab:red", label="loss, alone")
    ax.bar(xs, [mul * (r["int16_gain"] or 0) for r in rows], color="tab:blue", alpha=0.6,
           label="gain, int16 (rest int8)")
    if any("float_gain" in r for r in rows):
        ax.plot(xs, [mul * r.get("float_gain", float("nan")) for r in rows], "g.",
                label="gain, float (rest as quantized)")
    ax.set_xticks(list(xs), [r["unit"] for r in rows], rotation=90,
                  fontsize=6 if len(rows) > 40 else 8)
    ax.set_ylabel("SQNR (dB)" if metric == "sqnr" else "AP (points)")
    ax.set_title("per-layer sensitivity (alone: only this layer quantized)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=100)
    plt.close(fig)
    return paths


def ap_score(pipe: Any) -> Score:
    """A score: the recipe's metric (AP) of the model as configured on the whole val set."""
    from hatcore.workdir import flat_scores

    def score(model: QuantModel) -> float:
        return float(flat_scores(pipe.evaluate(model, device=torch.device("cpu"),
                                               desc="sensitivity")).get("AP", float("nan")))

    return score


def recipe_sensitivity(run: Any, stage: str, metric: str, batches: int, out: Path | None,
                       float_reverse: bool = True, echo: Callable[[str], None] | None = None
                       ) -> tuple[QuantModel, dict[str, Any], Path]:
    """The sensitivity of a recipe's ``stage`` model, cached in ``WORK_DIR/quant_debug/STAGE``.

    :param run: the recipe's run context (``HatContext.load``).
    :returns: the model (fake quant, CPU), the report record and its folder.
    """
    from hatcore.errors import UserError

    pipe = run
    model = pipe.load_stage_model(stage).cpu().eval()
    if not isinstance(model, QuantModel):
        raise UserError(f"the {stage} model of {pipe.source} is not a hat-bpu quantized model")
    ckpt = pipe.stage_checkpoint(stage)
    inputs = []
    if metric == "sqnr":
        for i, batch in enumerate(pipe.loader("val")):
            if i >= batches:
                break
            inputs.append(batch["img"])
    score = sqnr_score(inputs) if metric == "sqnr" else ap_score(pipe)
    out_dir = out or pipe.workdir.stage("quant_debug") / stage
    st = ckpt.stat()
    key = {"checkpoint": str(ckpt), "mtime": st.st_mtime_ns, "size": st.st_size,
           "quantize": pipe.resolved.get("quantize"), "metric": metric,
           "val": (pipe.resolved.get("data") or {}).get("val"),
           "batches": batches if metric == "sqnr" else None, "version": 2}
    n = len(units(model))
    seen = [0]

    def progress(name: str) -> None:
        seen[0] += 1
        if echo:
            echo(f"sensitivity [{seen[0]}/{n}] {name}")

    record = sensitivity(model, score, out_dir / "sensitivity.json", key, progress, float_reverse)
    record["metric"] = metric
    return model, record, out_dir
