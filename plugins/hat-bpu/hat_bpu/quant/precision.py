"""int8/int16 mixed precision under a latency budget (``hat tune-precision``).

From the sensitivity report (:mod:`hat_bpu.quant.sensitivity`: each unit's ``int16_gain``, the
score gained by that unit alone in int16 over the all-int8 model) and the perf model's cost of
that unit in int16 (:mod:`hat_bpu.device.perf` on the model's integer graph: the latency with
the unit's output tensors int16 minus the all-int8 latency — the unit's bytes double, and the
layers reading them take two passes of the int8 array), choose the set of int16 units that
maximises the summed gain with the estimated latency within the budget: a 0/1 knapsack, solved
exactly on costs rounded up to 1/2000 of the budget's headroom, then checked by estimating the
chosen set's latency as a whole (dropping the least gain per cost while it exceeds the budget).

The choice is written as ``[quantize] overrides``: the chosen units ``int16`` first, the
recipe's own ``float`` overrides kept, and ``"*" = "int8"`` last (first match wins).
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any

import tomllib

from hat_bpu.device.march import March
from hat_bpu.device.perf import estimate
from hat_bpu.ir import graph as ir
from hat_bpu.quant.sensitivity import unit_name
from hatcore.errors import UserError

_QUANTIZED = ("int8", "int16")


def with_dtypes(graph: ir.Graph, int16: set[str]) -> ir.Graph:
    """A copy of ``graph`` whose quantized tensors are int8, except the outputs of the nodes of
    the units ``int16`` (the perf model reads only shapes and dtypes)."""
    g = copy.copy(graph)
    g.tensors = {k: copy.copy(t) for k, t in graph.tensors.items()}
    for t in g.tensors.values():
        if t.dtype in _QUANTIZED:
            t.dtype = "int8"
    for n in graph.nodes:
        if unit_name(n.name) in int16:
            for o in n.outputs:
                if g.tensors[o].dtype in _QUANTIZED:
                    g.tensors[o].dtype = "int16"
    return g


def latency_ms(graph: ir.Graph, march: March, int16: set[str]) -> float:
    """The perf model's latency of ``graph`` with exactly the units ``int16`` in int16."""
    return float(estimate(with_dtypes(graph, int16), march)["latency_ms"])


def int16_costs(graph: ir.Graph, march: March, candidates: list[str]) -> dict[str, float]:
    """``{unit: ms}``: the latency each unit adds alone in int16 over the all-int8 graph."""
    base = latency_ms(graph, march, set())
    present = {unit_name(n.name) for n in graph.nodes}
    return {u: latency_ms(graph, march, {u}) - base for u in candidates if u in present}


def choose(gains: dict[str, float], costs: dict[str, float], headroom_ms: float
           ) -> list[str]:
    """The subset of units with the largest summed positive gain whose summed cost fits
    ``headroom_ms`` (0/1 knapsack on costs rounded up to ``headroom/2000``; free units with a
    gain are always taken)."""
    items = [u for u in gains if u in costs and gains[u] > 0]
    free = [u for u in items if costs[u] <= 0]
    paid = [u for u in items if costs[u] > 0]
    if headroom_ms <= 0 or not paid:
        return free
    res = headroom_ms / 2000
    cap = 2000
    w = {u: math.ceil(costs[u] / res - 1e-9) for u in paid}
    best = [0.0] * (cap + 1)
    keep = [[False] * (cap + 1) for _ in paid]
    for i, u in enumerate(paid):
        wi, gi = w[u], gains[u]
        for c in range(cap, wi - 1, -1):
            if best[c - wi] + gi > best[c]:
                best[c], keep[i][c] = best[c - wi] + gi, True
    chosen, c = [], cap
    for i in range(len(paid) - 1, -1, -1):
        if keep[i][c]:
            chosen.append(paid[i])
            c -= w[paid[i]]
    return free + chosen[::-1]


def tune(record: dict[str, Any], graph: ir.Graph, march: March, budget_ms: float
         ) -> dict[str, Any]:
    """The int16 choice for ``budget_ms`` from a sensitivity ``record`` and the integer graph.

    :returns: ``int16`` (units, most gain first), ``latency_ms`` (the chosen set estimated as a
        whole), ``int8_latency_ms``, ``budget_ms``, ``predicted_gain`` (summed ``int16_gain``:
        assumes the gains add up), ``costs``.
    :raises UserError: a budget below the all-int8 latency, naming both.
    """
    gains = {r["unit"]: float(r["int16_gain"]) for r in record["units"]
             if r.get("int16_gain") is not None}
    base = latency_ms(graph, march, set())
    if budget_ms < base:
        raise UserError(f"--latency-budget-ms {budget_ms:g} is below the all-int8 model's "
                        f"estimated latency on {march.name} ({base:.4f} ms): no int16 choice fits")
    costs = int16_costs(graph, march, list(gains))
    chosen = choose(gains, costs, budget_ms - base)
    lat = latency_ms(graph, march, set(chosen))
    while lat > budget_ms and chosen:  # costs do not add exactly: drop the worst value per ms
        worst = min((u for u in chosen if costs[u] > 0),
                    key=lambda u: gains[u] / costs[u], default=chosen[-1])
        chosen.remove(worst)
        lat = latency_ms(graph, march, set(chosen))
    chosen.sort(key=lambda u: -gains[u])
    return {"int16": chosen, "latency_ms": lat, "int8_latency_ms": base, "budget_ms": budget_ms,
            "all_int16_latency_ms": latency_ms(graph, march, set(costs)),
            "predicted_gain": sum(gains[u] for u in chosen), "costs": costs, "march": march.name}


def overrides_for(int16: list[str], existing: dict[str, str]) -> dict[str, str]:
    """``[quantize] overrides`` for the choice: int16 units, the recipe's float ones, then int8."""
    out = {u: "int16" for u in int16}
    out.update({k: v for k, v in existing.items() if v == "float" and k not in out})
    out["*"] = "int8"
    return out


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def overrides_line(overrides: dict[str, str]) -> str:
    """``overrides = { ... }`` as one TOML line."""
    return "overrides = { " + ", ".join(f"{_toml_str(k)} = {_toml_str(v)}"
                                        for k, v in overrides.items()) + " }"


def snippet(overrides: dict[str, str], quantize: dict[str, Any]) -> str:
    """A ready-to-paste ``[quantize]`` table: the recipe's keys with the new ``overrides``."""
    lines = ["[quantize]"]
    for k, v in quantize.items():
        if k != "overrides" and isinstance(v, (str, bool, int, float)):
            lit = _toml_str(v) if isinstance(v, str) else (str(v).lower() if isinstance(v, bool)
                                                            else repr(v))
            lines.append(f"{k} = {lit}")
    lines.append(overrides_line(overrides))
    return "\n".join(lines) + "\n"


_TABLE = re.compile(r"^\s*\[([^\]]+)\]\s*(#.*)?$")


def apply_to_recipe(text: str, overrides: dict[str, str], source: Path) -> str:
    """``text`` (a recipe) with its ``[quantize] overrides`` replaced by ``overrides``;
    comments and every other line are kept. A recipe without ``[quantize]`` gets one at the
    end (``type = "horizon"``).

    :raises UserError: overrides written as a ``[quantize.overrides]`` table (not rewritten).
    """
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if (m := _TABLE.match(ln))
                  and m.group(1).strip() == "quantize"), None)
    if any((m := _TABLE.match(ln)) and m.group(1).strip() == "quantize.overrides" for ln in lines):
        raise UserError(f"{source}: [quantize.overrides] is a table of its own; write it as "
                        "`overrides = { ... }` inside [quantize] for --apply to rewrite it")
    new = overrides_line(overrides)
    if start is None:
        out = [*lines, "", "[quantize]", 'type = "horizon"', new]
    else:
        end = next((i for i in range(start + 1, len(lines)) if _TABLE.match(lines[i])), len(lines))
        body = [ln for ln in lines[start + 1:end] if not re.match(r"^\s*overrides\s*=", ln)]
        out = [*lines[:start + 1], *body[:1], new, *body[1:]] if body and body[0].strip() \
            .startswith("type") else [*lines[:start + 1], new, *body]
        out += lines[end:]
    result = "\n".join(out) + "\n"
    tomllib.loads(result)  # still TOML
    return result


def tune_recipe(run: Any, recipe: Path, budget_ms: float, march_name: str | None, stage: str,
                metric: str, batches: int, apply: bool, echo: Any = None) -> str:
    """``hat tune-precision``: sensitivity (cached), int16 costs, the choice, the snippet.

    :param run: the recipe's run context (``HatContext.load``).
    :returns: the text printed (table, latencies, snippet, what was written).
    """
    from hat_bpu.device.march import get_march
    from hat_bpu.quant.convert import convert
    from hat_bpu.quant.sensitivity import recipe_sensitivity

    pipe = run
    qspec = pipe.section("quantize")
    if not hasattr(qspec, "overrides"):
        raise UserError(f"{recipe}: [quantize] type {qspec.type!r} has no overrides to tune")
    target = pipe.section("target").march
    march = get_march(march_name or target)
    model, record, out_dir = recipe_sensitivity(pipe, stage, metric, batches, None, False, echo)
    graph = convert(model, pipe.example_input(), march=target)
    res = tune(record, graph, march, budget_ms)
    gains = {r["unit"]: r["int16_gain"] for r in record["units"]}
    mul, unit = (1.0, "dB SQNR") if metric == "sqnr" else (100.0, "AP")
    lines = [f"{'int16 unit':<44} {'+ms':>8} {'gain':>8}"]
    lines += [f"{u[:44]:<44} {res['costs'][u]:>8.4f} {mul * gains[u]:>+8.3f}" for u in res["int16"]]
    over = overrides_for(res["int16"], dict(qspec.overrides))
    lines += ["", f"march {march.name}: all int8 {res['int8_latency_ms']:.4f} ms, all int16 "
              f"{res['all_int16_latency_ms']:.4f} ms; budget {budget_ms:g} ms -> chosen "
              f"{len(res['int16'])} int16 unit(s), {res['latency_ms']:.4f} ms (estimates of a "
              "modelled device)",
              f"expected gain over all int8: {mul * res['predicted_gain']:+.3f} {unit} (the "
              f"sum of each unit's gain alone; {metric} = "
              f"{'measured AP' if metric == 'ap' else 'output SQNR, not AP: use --metric ap for ΔAP'})",
              "", snippet(over, _plain_quantize(pipe))]
    out = {**res, "overrides": over, "metric": metric}
    (out_dir / "tune_precision.json").write_text(__import__("json").dumps(out, indent=1))
    lines.append(f"wrote {out_dir / 'tune_precision.json'}")
    if apply:
        target = recipe.with_name(recipe.stem + ".tuned.toml")
        target.write_text(apply_to_recipe(recipe.read_text(), over, recipe))
        lines.append(f"wrote {target} (same work dir: calibration and what follows rerun with "
                     "the new overrides; float is reused)")
    return "\n".join(lines)


def _plain_quantize(pipe: Any) -> dict[str, Any]:
    raw = pipe.raw.get("quantize") if isinstance(pipe.raw, dict) else None
    return dict(raw) if isinstance(raw, dict) else {"type": pipe.section("quantize").type}
