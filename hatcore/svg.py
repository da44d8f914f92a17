"""Small inline-SVG charts for the HTML run report (``hatcore.report``) and plugins' sections.

Why SVG written by hand rather than matplotlib PNGs: the report must open anywhere without a
network and without an optional dependency (matplotlib is an extra; without it the old
``vis/curves.png`` was silently missing). SVG text stays sharp at any zoom, is searchable, and a
``<title>`` on each mark gives the exact value on hover; a chart is a few KB instead of a
base64 PNG of tens of KB. Three chart kinds cover the report: lines (loss, lr, AP, PR
curves), bars along x (per-layer and per-block time, SQNR) and a heatmap (confusion matrix).

Every function returns one ``<svg>`` element as a string; all text is escaped here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")
"""Series colours (matplotlib's tab10), in order."""

FONT = "font-family='system-ui,sans-serif'"


def colour(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values from at or below ``lo`` to at or above ``hi`` (steps of
    1, 2, 2.5 or 5 × 10^k)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(k * step, 12) for k in range(first, last + 1)]


def fmt_num(v: float) -> str:
    """A tick/value label: 3 significant digits, no trailing zeros, e-notation when tiny."""
    if v == 0:
        return "0"
    if abs(v) < 1e-3 or abs(v) >= 1e5:
        return f"{v:.1e}"
    return f"{v:.3g}"


def tick_labels(ticks: Sequence[float]) -> list[str]:
    """Tick labels with as many decimals as the step needs (2.6, 2.605, 2.61 — never 2.6, 2.6)."""
    if len(ticks) < 2:
        return [fmt_num(t) for t in ticks]
    step = abs(ticks[1] - ticks[0]) or 1.0
    big = max(abs(t) for t in ticks)
    if big >= 1e5 or big < 1e-3:
        return [fmt_num(t) for t in ticks]
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    if abs(round(step * 10**decimals) - step * 10**decimals) > 1e-6:
        decimals += 1  # a step of 2.5 × 10^k
    return [f"{t:.{decimals}f}" for t in ticks]


def line_chart(series: Sequence[tuple[str, Sequence[float], Sequence[float]]], *, title: str,
               xlabel: str, ylabel: str, width: int = 460, height: int = 260,
               ylim: tuple[float, float] | None = None, markers: bool = False) -> str:
    """Lines ``(label, xs, ys)`` on shared axes, with ticks, grid and a legend.

    Non-finite points are skipped. ``ylim`` fixes the y range (e.g. ``(0, 1)`` for precision).
    """
    pts = [(x, y) for _, xs, ys in series for x, y in zip(xs, ys, strict=False)
           if math.isfinite(x) and math.isfinite(y)]
    left, right, top, bottom = 58, 12, 28, 44
    legend_h = 16 * ((len(series) + 2) // 3) + 4 if len(series) > 1 else 0
    h = height + legend_h
    pw, ph = width - left - right, height - top - bottom
    out = [f"<svg xmlns='http://www.w3.org/2000/svg' class='chart' width='{width}' height='{h}' "
           f"viewBox='0 0 {width} {h}' {FONT} font-size='11'>",
           f"<text x='{width / 2}' y='16' text-anchor='middle' font-weight='600'>"
           f"{escape(title)}</text>"]
    if not pts:
        out.append(f"<text x='{width / 2}' y='{h / 2}' text-anchor='middle' fill='#777'>"
                   "no data</text></svg>")
        return "".join(out)
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = ylim or (min(p[1] for p in pts), max(p[1] for p in pts))
    if y1 <= y0:
        y0, y1 = y0 - (abs(y0) * 0.1 or 0.5), y1 + (abs(y1) * 0.1 or 0.5)
    if x1 <= x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    xt, yt = nice_ticks(x0, x1), nice_ticks(y0, y1)
    if ylim is None:
        y0, y1 = min(y0, yt[0]), max(y1, yt[-1])

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * ph

    for t, lab in zip(yt, tick_labels(yt), strict=True):
        if y0 - 1e-12 <= t <= y1 + 1e-12:
            out.append(f"<line x1='{left}' x2='{left + pw}' y1='{sy(t):.1f}' y2='{sy(t):.1f}' "
                       f"stroke='#e3e3e3'/><text x='{left - 4}' y='{sy(t) + 4:.1f}' "
                       f"text-anchor='end'>{lab}</text>")
    for t, lab in zip(xt, tick_labels(xt), strict=True):
        if x0 - 1e-12 <= t <= x1 + 1e-12:
            out.append(f"<line y1='{top}' y2='{top + ph}' x1='{sx(t):.1f}' x2='{sx(t):.1f}' "
                       f"stroke='#efefef'/><text x='{sx(t):.1f}' y='{top + ph + 14}' "
                       f"text-anchor='middle'>{lab}</text>")
    out.append(f"<rect x='{left}' y='{top}' width='{pw}' height='{ph}' fill='none' "
               f"stroke='#999'/>")
    out.append(f"<text x='{left + pw / 2}' y='{top + ph + 32}' text-anchor='middle'>"
               f"{escape(xlabel)}</text>")
    out.append(f"<text transform='translate(14,{top + ph / 2}) rotate(-90)' "
               f"text-anchor='middle'>{escape(ylabel)}</text>")
    for i, (label, xs, ys) in enumerate(series):
        c = colour(i)
        good = [(sx(x), sy(min(max(y, y0), y1))) for x, y in zip(xs, ys, strict=False)
                if math.isfinite(x) and math.isfinite(y)]
        if not good:
            continue
        path = " ".join(f"{a:.1f},{b:.1f}" for a, b in good)
        out.append(f"<polyline fill='none' stroke='{c}' stroke-width='1.6' points='{path}'>"
                   f"<title>{escape(label)}</title></polyline>")
        if markers or len(good) == 1:
            for (a, b), x, y in zip(good, xs, ys, strict=False):
                out.append(f"<circle cx='{a:.1f}' cy='{b:.1f}' r='3' fill='{c}'><title>"
                           f"{escape(label)}: {fmt_num(x)}, {fmt_num(y)}</title></circle>")
    if len(series) > 1:
        col_w = (width - left) / 3
        for i, (label, _, _) in enumerate(series):
            lx = left + (i % 3) * col_w
            ly = height + 10 + 16 * (i // 3)
            out.append(f"<rect x='{lx:.1f}' y='{ly - 8}' width='12' height='4' "
                       f"fill='{colour(i)}'/><text x='{lx + 16:.1f}' y='{ly - 3}'>"
                       f"{escape(label[:28])}</text>")
    out.append("</svg>")
    return "".join(out)


def hbar_chart(items: Sequence[tuple[str, float, str]], *, title: str, xlabel: str,
               width: int = 720, label_w: int = 230, unit: str = "",
               colours: Sequence[str] | None = None) -> str:
    """Bars along the x axis, one a row: ``(label, value, tooltip)`` in the given order, the
    value printed at the end of each bar, an x axis with ticks at the top and bottom.
    ``colours`` per bar (default the first palette colour)."""
    bar, gap, top = 14, 3, 34
    n = len(items)
    h = top + n * (bar + gap) + 30
    vmax = max((v for _, v, _ in items if math.isfinite(v)), default=1.0)
    vmin = min(0.0, min((v for _, v, _ in items if math.isfinite(v)), default=0.0))
    ticks = nice_ticks(vmin, vmax if vmax > vmin else vmin + 1)
    hi = max(ticks[-1], vmax)
    pw = width - label_w - 70

    def sx(v: float) -> float:
        return label_w + (v - vmin) / ((hi - vmin) or 1) * pw

    out = [f"<svg xmlns='http://www.w3.org/2000/svg' class='chart' width='{width}' height='{h}' "
           f"viewBox='0 0 {width} {h}' {FONT} font-size='11'>",
           f"<text x='{width / 2}' y='14' text-anchor='middle' font-weight='600'>"
           f"{escape(title)}</text>"]
    base = top + n * (bar + gap)
    for t in ticks:
        out.append(f"<line x1='{sx(t):.1f}' x2='{sx(t):.1f}' y1='{top - 4}' y2='{base}' "
                   f"stroke='#e6e6e6'/><text x='{sx(t):.1f}' y='{top - 8}' text-anchor='middle'>"
                   f"{fmt_num(t)}</text><text x='{sx(t):.1f}' y='{base + 13}' "
                   f"text-anchor='middle'>{fmt_num(t)}</text>")
    out.append(f"<text x='{label_w + pw / 2}' y='{base + 27}' text-anchor='middle'>"
               f"{escape(xlabel)}</text>")
    for i, (label, v, tip) in enumerate(items):
        y = top + i * (bar + gap)
        c = colours[i] if colours else PALETTE[0]
        x = sx(min(0.0, v)) if math.isfinite(v) else label_w
        w = abs(sx(v) - sx(0.0)) if math.isfinite(v) else 0
        short = label if len(label) <= 36 else "…" + label[-35:]
        out.append(f"<text x='{label_w - 4}' y='{y + 11}' text-anchor='end'>{escape(short)}"
                   f"</text><rect x='{x:.1f}' y='{y}' width='{max(w, 0.5):.1f}' height='{bar}' "
                   f"fill='{c}'><title>{escape(label)}: {escape(tip)}</title></rect>"
                   f"<text x='{x + w + 3:.1f}' y='{y + 11}'>{fmt_num(v)}{escape(unit)}</text>")
    out.append("</svg>")
    return "".join(out)


def heatmap(rows: Sequence[str], cols: Sequence[str], matrix: Sequence[Sequence[float]], *,
            title: str, xlabel: str, ylabel: str, cell: int | None = None) -> str:
    """A matrix as coloured cells (white → blue by value / row maximum) with the count printed
    in each non-zero cell when cells are large enough; a tooltip names row, column and value."""
    n_r, n_c = len(rows), len(cols)
    cell = cell or max(8, min(34, 640 // max(1, n_c)))
    lab = min(150, 8 + 6 * max((len(r) for r in rows), default=4))
    top = 30 + min(150, 8 + 6 * max((len(c) for c in cols), default=4))
    w, h = lab + n_c * cell + 24, top + n_r * cell + 30
    out = [f"<svg xmlns='http://www.w3.org/2000/svg' class='chart' width='{w}' height='{h}' "
           f"viewBox='0 0 {w} {h}' {FONT} font-size='{10 if cell >= 16 else 7}'>",
           f"<text x='{w / 2}' y='14' text-anchor='middle' font-weight='600' font-size='11'>"
           f"{escape(title)}</text>"]
    for j, c in enumerate(cols):
        x = lab + j * cell + cell / 2
        out.append(f"<text transform='translate({x + 3:.1f},{top - 4}) rotate(-60)'>"
                   f"{escape(c[:24])}</text>")
    for i, r in enumerate(rows):
        y = top + i * cell
        out.append(f"<text x='{lab - 4}' y='{y + cell / 2 + 3:.1f}' text-anchor='end'>"
                   f"{escape(r[:24])}</text>")
        row_max = max((v for v in matrix[i]), default=0) or 1
        for j, v in enumerate(matrix[i]):
            if not v:
                continue
            a = 0.12 + 0.88 * v / row_max
            x = lab + j * cell
            dark = a > 0.55
            out.append(f"<rect x='{x}' y='{y}' width='{cell - 1}' height='{cell - 1}' "
                       f"fill='rgba(31,119,180,{a:.2f})'><title>{escape(r)} → {escape(cols[j])}: "
                       f"{fmt_num(v)}</title></rect>")
            if cell >= 16:
                out.append(f"<text x='{x + cell / 2:.1f}' y='{y + cell / 2 + 3:.1f}' "
                           f"text-anchor='middle' fill='{'#fff' if dark else '#000'}'>"
                           f"{fmt_num(v)}</text>")
    out.append(f"<rect x='{lab}' y='{top}' width='{n_c * cell}' height='{n_r * cell}' "
               f"fill='none' stroke='#999'/>")
    out.append(f"<text x='{lab + n_c * cell / 2}' y='{h - 8}' text-anchor='middle' "
               f"font-size='11'>{escape(xlabel)}</text>")
    out.append(f"<text transform='translate(10,{top + n_r * cell / 2}) rotate(-90)' "
               f"text-anchor='middle' font-size='11'>{escape(ylabel)}</text></svg>")
    return "".join(out)
