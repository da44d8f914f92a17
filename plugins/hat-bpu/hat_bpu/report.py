"""hat-bpu's sections of ``report.html`` (``report_sections`` hook): the device estimate of
``compile/perf.json`` and, when ``hat quant-debug`` has run, the worst-quantized layers of
``quant_debug/<stage>/quant_debug.json``."""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any

from hatcore.report import Section, table
from hatcore.svg import hbar_chart

WORST = 15
"""Layers shown per quant-debug stage (lowest SQNR first)."""


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def sections(work_dir: Path) -> list[Section]:
    from hat_bpu.device.perf import html_body

    out = []
    perf = _json(Path(work_dir) / "compile" / "perf.json")
    if perf and perf.get("layers"):
        out.append(Section("perf", "Estimated device performance", html_body(perf), 70))
    debug = {p.parent.name: d for p in sorted(Path(work_dir).glob("quant_debug/*/quant_debug.json"))
             if (d := _json(p)) and d.get("layers")}
    if debug:
        out.append(Section("quant_debug", "Quantization debug (worst layers)",
                           quant_debug_html(debug), 80))
    return out


def quant_debug_html(debug: dict[str, dict[str, Any]]) -> str:
    parts = ["<p>Per-layer error of the fake-quant model against the float model on validation "
             f"batches (<code>hat quant-debug</code>): the {WORST} layers with the lowest SQNR "
             "per stage; red bars are flagged layers.</p>"]
    for stage, data in debug.items():
        worst = sorted(data["layers"], key=lambda r: r["sqnr_db"])[:WORST]
        parts.append(f"<h3>{escape(stage)}</h3><div class=row>")
        parts.append(hbar_chart(
            [(r["layer"], r["sqnr_db"], f"{r['dtype']}, cosine {r['cosine']:.5f}") for r in worst],
            title="SQNR float vs fake quant (dB), lowest first", xlabel="dB", unit=" dB",
            colours=["#d62728" if r["flags"] else "#1f77b4" for r in worst]))
        parts.append(table(["layer", "type", "dtype", "observer", "cosine", "SQNR dB", "max LSB",
                            "flags"],
                           [[r["layer"], r["type"], r["dtype"], r["observer"], f"{r['cosine']:.5f}",
                             f"{r['sqnr_db']:.2f}", f"{r['max_err_lsb']:.2f}",
                             "; ".join(r["flags"])] for r in worst], numeric_from=4))
        parts.append("</div>")
    return "".join(parts)
