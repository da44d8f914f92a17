"""report.html from a work dir: the core's sections, plugins' sections (``report_sections``),
a self-contained page; and the SVG charts it is drawn with."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from hatcore import hookimpl, report, svg
from hatcore.plugins import make_plugin_manager
from hatcore.report import Section


def _work(tmp_path: Path) -> Path:
    work = tmp_path / "run"
    (work / "float").mkdir(parents=True)
    (work / "float" / "log.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"kind": "lr", "lr": 0.1},
        {"kind": "iter", "step": 10, "loss": 3.0, "lr": 0.05},
        {"kind": "iter", "step": 20, "loss": 2.0, "lr": 0.1},
        {"kind": "epoch", "epoch": 0, "loss": 2.5, "lr": 0.1, "AP": 0.25},
        {"kind": "epoch", "epoch": 1, "loss": 1.5, "lr": 0.05, "AP": 0.5}]) + "\n{cut")
    (work / "summary.json").write_text(json.dumps({"work_dir": str(work), "stages": [
        {"stage": "float", "AP": 0.8625, "AP50": 0.9, "delta_AP": 0.0, "delta_prev_AP": None},
        {"stage": "qat", "AP": 0.85, "AP50": 0.89, "delta_AP": -0.0125, "delta_prev_AP": -0.0125,
         "arithmetic": "integer"}],
        "device": {"march": "m1", "input_shape": [1, 3, 8, 8], "latency_ms": 1.5, "fps": 666.7}}))
    (work / "recipe.resolved.json").write_text(json.dumps(
        {"source": "r.toml", "overrides": ["a=1"], "recipe": {"task": {"name": "toy<run>"}}}))
    (work / "recipe.toml").write_text("[task]\nname = 'toy<run>'\n")
    return work


class Extra:
    @hookimpl
    def report_sections(self, work_dir: Path, summary: dict) -> list[Section]:
        return [Section("extra", "Extra & more", f"<p id=x>{len(summary['stages'])} rows in "
                        f"{Path(work_dir).name}</p>", order=15)]


def test_hook_report_sections(tmp_path: Path) -> None:
    work = _work(tmp_path)
    pm = make_plugin_manager(entrypoints=False, extra=[("extra", Extra())])
    found = pm.hook.report_sections(work_dir=work, summary={"stages": [1, 2]})
    assert found == [[Section("extra", "Extra & more", "<p id=x>2 rows in run</p>", 15)]]
    page = report.write(work, pm.hook).read_text()
    ids = re.findall(r"<section id='sec-(\w+)' data-section='\w+'>", page)
    assert ids == ["stages", "extra", "curves", "drawings", "recipe"]  # by order
    assert "<p id=x>2 rows in run</p>" in page and "Extra &amp; more" in page


def test_the_core_sections_show_points_deltas_curves_and_the_recipe(tmp_path: Path) -> None:
    work = _work(tmp_path)
    page = report.write(work, make_plugin_manager(entrypoints=False).hook).read_text()
    rows = re.findall(r"<tr><td>([^<]+)</td>" + r"<td class=num>([^<]+)</td>" * 4, page)
    assert rows == [("float", "86.25", "90.00", "+0.00", "-"),
                    ("qat (integer)", "85.00", "89.00", "-1.25", "-1.25")]
    assert "1.500 ms/frame" in page and "<title>HAT run report — toy&lt;run&gt;</title>" in page
    assert "name = &#x27;toy&lt;run&gt;&#x27;" in page and "a=1" in page  # recipe.toml, the overrides
    curves = page[page.index("<section id='sec-curves'"):page.index("<section id='sec-drawings'")]
    assert curves.count("<svg") == 3  # loss, lr, AP (a line cut by a crash is skipped)
    # AP in points on the y axis: 25 and 50 are plotted, ticks run 25..50
    assert ">validation AP during training<" in curves and ">50<" in curves
    assert "No drawings in vis/" in page
    assert not re.search(r"""(src|href)\s*=\s*['"]?(https?:|//)""", page)


def test_drawings_are_inlined_and_a_run_without_validation_says_so(tmp_path: Path) -> None:
    work = _work(tmp_path)
    log = work / "float" / "log.jsonl"
    log.write_text("".join(line + "\n" for line in log.read_text().splitlines()
                           if '"AP"' not in line))
    png = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                        "1f15c4890000000d49444154789c6360f8cf000000030101007aa9a8b20000000049454e44ae426082")
    (work / "vis" / "compare").mkdir(parents=True)
    (work / "vis" / "compare" / "7.jpg").write_bytes(png)
    (work / "vis" / "float_0.png").write_bytes(png)
    hook = make_plugin_manager(entrypoints=False).hook
    page = report.write(work, hook).read_text()
    # the comparison only: the single-stage picture shows the same image without ground truth
    assert page.count("src='data:") == 1 and "image 7" in page
    assert "No validation during training" in page
    (work / "vis" / "compare" / "7.jpg").unlink()
    page = report.write(work, hook).read_text()
    assert page.count("src='data:") == 1 and "<figcaption>float_0</figcaption>" in page


def test_nice_ticks_and_chart_text_are_escaped() -> None:
    assert svg.nice_ticks(0, 1) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert svg.nice_ticks(0.013, 0.048, 4) == pytest.approx([0.01, 0.02, 0.03, 0.04, 0.05])
    chart = svg.line_chart([("a<b", [1, 2], [3, 4])], title="t&", xlabel="x", ylabel="y")
    assert "a&lt;b" in chart and "t&amp;" in chart and "<polyline" in chart
    bars = svg.hbar_chart([("slow", 2.0, "x"), ("fast", 0.5, "y")], title="b", xlabel="ms",
                          unit=" ms")
    assert re.findall(r">(\d\.?\d*) ms</text>", bars) == ["2", "0.5"]  # values printed, in order
    assert svg.line_chart([], title="t", xlabel="x", ylabel="y").count("no data") == 1
    heat = svg.heatmap(["a", "b"], ["a", "b"], [[2, 0], [1, 3]], title="c", xlabel="p",
                       ylabel="t")
    assert heat.count("<rect x=") == 3 + 1  # the non-zero cells and the frame


def test_hat_report_command(tmp_path: Path) -> None:
    import subprocess
    import sys

    work = _work(tmp_path)
    hat = [sys.executable, "-c", "from hatcore.cli import main; main()", "report"]
    proc = subprocess.run([*hat, str(work)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(work / "report.html")
    assert "<section id='sec-stages'" in (work / "report.html").read_text()
    for target, why in ((tmp_path, "not a HAT work dir"), (tmp_path / "no", "no such work dir")):
        bad = subprocess.run([*hat, str(target)], capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and why in bad.stderr and "Traceback" not in bad.stderr


def test_tick_labels_keep_the_digits_the_step_needs() -> None:
    assert svg.tick_labels(svg.nice_ticks(2.6, 2.61)) == ["2.600", "2.602", "2.604", "2.606",
                                                          "2.608", "2.610"]
    assert svg.tick_labels([0, 2.5, 5]) == ["0.0", "2.5", "5.0"]
    assert svg.tick_labels([0, 0.2, 0.4]) == ["0.0", "0.2", "0.4"]
    assert svg.tick_labels([0, 50, 100]) == ["0", "50", "100"]
