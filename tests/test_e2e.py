"""End to end with the real plugins: recipes/demo.toml on a tiny configuration, every stage.

Generated shapes → LMDB → float → calibration → QAT → export (.hbir) → compile (.hbm) → predict
of all five stages → summary, drawings and `hat info` on the artifacts. Numbers are not checked
for quality here (a few iterations on 64-pixel images learn little); bench/RESULTS.md holds the
demo's real figures.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("hat_fcos")
pytest.importorskip("hat_coco")
pytest.importorskip("hat_bpu")

TINY = [
    "data.train.source.num_images=16", "data.val.source.num_images=8",
    "data.train.batch_size=4", "data.val.batch_size=4", "data.train.num_workers=0",
    "data.train.transforms.0.img_scale=[64, 64]", "data.train.transforms.1.size=[64, 64]",
    "data.train.transforms.2.divisor=64", "data.val.transforms.0.img_scale=[64, 64]",
    "data.val.transforms.1.divisor=64", "export.input_shape=[1, 3, 64, 64]",
    "stages.float.epochs=1", "stages.float.max_iters_per_epoch=2",
    "stages.calibration.batches=1",
    "stages.qat.epochs=1", "stages.qat.max_iters_per_epoch=1", "predict.vis_images=1",
    # two iterations leave the class scores near the focal prior (0.01): keep low scores so that
    # every stage has detections to compare; the device-side filter keeps the same threshold
    "model.decoder.score_thr=0.001", "compile.filter_score_thr=0.001",
]


def hat(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "hatcore", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):  # type: ignore[no-untyped-def]
    cwd = tmp_path_factory.mktemp("e2e")
    shutil.copytree(ROOT / "recipes", cwd / "recipes")
    sets = [a for s in TINY for a in ("--set", s)]
    proc = hat("run", "recipes/demo.toml", *sets, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return cwd, proc, sets


def test_every_stage_leaves_its_artifacts(demo_run) -> None:
    cwd, _, _ = demo_run
    work = cwd / "runs" / "demo"
    for rel in ["recipe.toml", "recipe.resolved.json", "float/checkpoint-best.pt", "float/log.jsonl",
                "calibration/checkpoint-best.pt", "qat/checkpoint-best.pt", "export/model.hbir",
                "compile/model.hbm", "compile/perf.json", "compile/perf.html", "summary.md",
                "vis/curves.png", "vis/qat_0.png", "report.html"]:
        assert (work / rel).is_file(), rel
    assert (cwd / "tmp_data" / "shapes" / "train_lmdb").is_dir()
    ann = json.loads((cwd / "tmp_data" / "shapes" / "annotations" / "instances_val2017.json")
                     .read_text())
    image_ids = {im["id"] for im in ann["images"]}
    cat_ids = {c["id"] for c in ann["categories"]}
    for stage in ("float", "calibration", "qat", "int_infer", "align_bpu"):
        metrics = json.loads((work / "predict" / stage / "metrics.json").read_text())
        assert metrics["schema"] == 1 and metrics["stage"] == stage
        dets = json.loads((work / "predict" / stage / "detections.json").read_text())
        assert dets, stage  # the tiny run still detects something (scores above the threshold)
        assert {d["image_id"] for d in dets} <= image_ids  # original ids, not loader indices
        assert {d["category_id"] for d in dets} <= cat_ids
        assert all(len(d["bbox"]) == 4 and d["bbox"][2] > 0 and d["bbox"][3] > 0 for d in dets)
        # the AP written is the AP of the detections written: recomputed with pycocotools
        assert metrics["bbox"]["AP"] == pytest.approx(_pycocotools_ap(cwd, dets), abs=1e-4), stage


def test_logs_are_lines_and_ap_is_in_points(demo_run) -> None:
    """Run without a terminal (as in CI or `> log`): no progress-bar frames, AP in points."""
    _, proc, _ = demo_run
    assert "\r" not in proc.stderr and "\r" not in proc.stdout
    ap = re.findall(r"^predict (\w+): AP (\S+)  AP50 (\S+) \(points\)$", proc.stderr, re.M)
    onnx_rows = ["onnx_int", "onnx_float"] if importlib.util.find_spec("hat_onnx") else []
    assert [row for row, _, _ in ap] == ["float", "calibration", "qat", "int_infer", *onnx_rows,
                                         "align_bpu"]


def _pycocotools_ap(cwd: Path, dets: list[dict]) -> float:
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(cwd / "tmp_data" / "shapes" / "annotations" / "instances_val2017.json"))
        ev = COCOeval(gt, gt.loadRes([{k: d[k] for k in ("image_id", "category_id", "bbox",
                                                          "score")} for d in dets]), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0])


def test_summary_table_lists_five_stages_and_the_latency(demo_run) -> None:
    cwd, proc, _ = demo_run
    summary = json.loads((cwd / "runs" / "demo" / "summary.json").read_text())
    onnx_rows = ["onnx_int", "onnx_float"] if importlib.util.find_spec("hat_onnx") else []
    assert [r["stage"] for r in summary["stages"]] == [
        "float", "calibration", "qat", "int_infer", *onnx_rows, "align_bpu"]
    rows = {r["stage"]: r for r in summary["stages"]}
    if onnx_rows:  # ONNX Runtime on the bit-exact integer form: the simulator's AP, the float AP
        assert rows["onnx_int"]["AP"] == rows["int_infer"]["AP"]
        assert rows["onnx_float"]["AP"] == pytest.approx(rows["float"]["AP"], abs=0.01)
    assert summary["device"]["march"] == "bayes-e" and summary["device"]["latency_ms"] > 0
    assert "align_bpu" in proc.stdout and "ms/frame" in proc.stdout
    perf = json.loads((cwd / "runs" / "demo" / "compile" / "perf.json").read_text())
    assert perf["input_shape"] == [1, 3, 64, 64]


def test_int_infer_and_align_bpu_detect_the_same_with_the_same_input(demo_run) -> None:
    """The simulator (int_infer) and the compiled program on its runtime (align_bpu) are two
    implementations of one integer model: given the same YUV444 input they must give the same
    detections, box for box. The default board input is NV12 (chroma subsampled), so the default
    run's align_bpu row differs from int_infer by the input path alone; this run switches both
    to yuv444 on a copy of the work dir (float, calibration and QAT are reused, not retrained)."""
    cwd, _, sets = demo_run
    shutil.copytree(cwd / "runs" / "demo", cwd / "runs" / "yuv444")
    proc = hat("run", "recipes/demo.toml", *sets, "--set", "task.work_dir=runs/yuv444",
               "--set", "target.input_layout=yuv444",
               cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in ("float", "calibration", "qat"):
        assert f"{stage}: done, inputs unchanged, skipped" in proc.stderr
    assert "export: wrote" in proc.stderr and "compile: " in proc.stderr

    def dets(stage: str) -> list[dict]:
        return json.loads((cwd / "runs" / "yuv444" / "predict" / stage / "detections.json")
                          .read_text())

    assert dets("int_infer"), "no detections: the comparison would be empty"
    assert dets("align_bpu") == dets("int_infer")
    # exact_eval (default): the fake-quant QAT model evaluates with the integer arithmetic
    assert dets("qat") == dets("int_infer")


def test_rerun_only_prints_the_summary_and_info_verifies_artifacts(demo_run) -> None:
    cwd, _, sets = demo_run
    again = hat("run", "recipes/demo.toml", *sets, cwd=cwd)
    assert again.returncode == 0, again.stderr[-3000:]
    for stage in ("float", "calibration", "qat", "export", "compile"):
        assert f"{stage}: done, inputs unchanged, skipped" in again.stderr
    assert "float 1/1" not in again.stderr  # nothing trained
    work = cwd / "runs" / "demo"
    for artifact in ("compile/model.hbm", "export/model.hbir", "float/checkpoint-best.pt",
                     "../../tmp_data/shapes/val_lmdb"):
        info = hat("info", str(work / artifact), cwd=cwd)
        assert info.returncode == 0, (artifact, info.stderr)


@pytest.mark.parametrize("stage", ["float", "int_infer", "align_bpu"])
def test_infer_draws_one_image_with_each_kind_of_model(demo_run, stage: str) -> None:
    cwd, _, sets = demo_run
    image = sorted((cwd / "tmp_data" / "shapes" / "val2017").glob("*.jpg"))[0]
    out = cwd / f"infer_{stage}.png"
    proc = hat("infer", "recipes/demo.toml", "--image", str(image), "--out", str(out),
               "--stage", stage, *sets, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_calops_and_perf_and_check_on_the_demo_recipe(demo_run) -> None:
    cwd, _, sets = demo_run
    calops = hat("calops", "recipes/demo.toml", "--input-shape", "1,3,64,64", *sets, cwd=cwd)
    assert calops.returncode == 0, calops.stderr[-3000:]
    assert "GFLOPs" in calops.stdout or "GFLOP" in calops.stdout
    perf = hat("perf", "recipes/demo.toml", "--json", cwd=cwd)
    assert perf.returncode == 0, perf.stderr[-3000:]
    assert json.loads(perf.stdout)["latency_ms"] > 0
    check = hat("check", "recipes/demo.toml", cwd=cwd)
    assert check.returncode == 0, check.stderr[-3000:]


def _browser():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("hat_test_browser", ROOT / "tests" / "browser.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REPORT_SECTIONS = ["stages", "curves", "per_class_ap", "pr_curves", "confusion", "drawings", "perf",
                   "recipe"]


def test_comparison_drawings_show_float_and_deployed_on_the_same_images(demo_run) -> None:
    import cv2

    cwd, proc, _ = demo_run
    pictures = sorted((cwd / "runs" / "demo" / "vis" / "compare").glob("*.jpg"))
    assert [p.stem for p in pictures] == ["1"]  # predict.vis_images = 1: the first val image
    ann = json.loads((cwd / "tmp_data" / "shapes" / "annotations" / "instances_val2017.json")
                     .read_text())
    first = next(im for im in ann["images"] if im["id"] == 1)
    original = cv2.imread(str(cwd / "tmp_data" / "shapes" / "val2017" / first["file_name"]))
    scale = min(1.0, 480 / max(original.shape[:2]))
    pw, ph = round(original.shape[1] * scale), round(original.shape[0] * scale)
    img = cv2.imread(str(pictures[0]))
    # three panels (ground truth, float, align_bpu) of the original image, 6 px apart, titled
    assert img.shape[1] == 3 * pw + 2 * 6 and img.shape[0] > ph
    assert "ground truth beside the float and the deployed model" in proc.stdout


def test_report_html_renders_in_chromium(demo_run, tmp_path) -> None:
    """report.html of the run, opened in headless Chromium: every section there, no image broken,
    nothing fetched from a network; and the check sees a broken image when there is one."""
    browser = _browser()
    if browser.chromium() is None:
        pytest.skip("chromium is not installed: `make setup` installs the Debian package "
                    "`chromium` where it can (as root, with apt-get); here it could not")
    cwd, _, _ = demo_run
    page = cwd / "runs" / "demo" / "report.html"
    text = page.read_text()
    assert not re.search(r"""(src|href)\s*=\s*['"]?(https?:|//)""", text), "fetches from a network"
    check = browser.report_check(browser.dump_dom(page))
    assert check.get("ready") == "1", check
    assert check["sections"].split(",") == REPORT_SECTIONS
    # the one comparison picture (vis_images = 1); vis/qat_0.png shows the same image without
    # ground truth and is left out
    assert check["images"] == "1" and check["broken"] == "0", check["broken-alt"]
    assert int(check["svgs"]) >= 8  # loss, lr, 2 overall PR, per-class PR, 2 confusion, perf
    bad = tmp_path / "bad.html"
    bad.write_text(text.replace("</main>", "<img alt='bad one' src='data:image/png;base64,AAAA'>"
                                           "</main>"))
    check = browser.report_check(browser.dump_dom(bad))
    assert (check["broken"], check["broken-alt"]) == ("1", "bad one")
