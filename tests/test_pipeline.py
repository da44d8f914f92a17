"""The stage graph end to end on the toy plugin, with a stand-in backend plugin in the test.

The stand-in quantizer/exporter/compiler/runtime is deliberately trivial (it records how the core
calls it); the real ones are tested in plugins/hat-bpu. What is tested here is the core's side:
every stage runs in order with the right arguments, artifacts land where DESIGN.md says, a rerun
skips everything, and a changed setting reruns exactly that stage and the ones after it.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from hatcore import hookimpl
from hatcore.plugins import make_plugin_manager, set_plugins
from hatcore.recipe import CompileSpec, ExportSpec, QuantizeSpec, option, spec

RECIPE = """
[task]
name = "toy"
work_dir = "{work}"
device = "cpu"

[model]
type = "toy_detector"

[data.train]
type = "toy_squares"
length = 16
batch_size = 4
transforms = [{{ type = "toy_flip" }}]

[data.val]
type = "toy_squares"
length = 8
batch_size = 4

[metric]
type = "toy_hits"

[stages.float]
epochs = 2
optimizer = {{ lr = 0.05 }}

[stages.calibration]
batches = 2

[stages.qat]
epochs = 1
optimizer = {{ lr = 0.01 }}

[quantize]
type = "stand_in"

[export]
type = "stand_in"
input_shape = [1, 3, 32, 32]

[compile]
type = "stand_in"
target = "toy-chip"

[predict]
vis_images = 0
"""


@spec
class StandInQuantize(QuantizeSpec):
    bits: int = option(8, doc="bits")
    exact: bool = option(False, doc="the model says it evaluates with integer arithmetic")


@spec
class StandInExport(ExportSpec):
    artifact = "graph.bin"


@spec
class StandInCompile(CompileSpec):
    artifact = "program.bin"
    target: str = option("chip", doc="the target's name")


class ModeProbe(nn.Module):
    """Remembers the quant mode it was switched to (and counts observed batches)."""

    def __init__(self) -> None:
        super().__init__()
        self.mode = "none"
        self.register_buffer("observed", torch.zeros((), dtype=torch.long))

    def hat_set_mode(self, mode: str) -> None:
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "observe":
            self.observed += 1
        return x


class StandIn:
    """A backend that records every call the core makes to it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    @hookimpl
    def hat_components(self, register):  # type: ignore[no-untyped-def]
        register("quantizer", "stand_in", StandInQuantize)
        register("exporter", "stand_in", StandInExport)
        register("compiler", "stand_in", StandInCompile)

    @hookimpl
    def quantize(self, model, spec, stage):  # type: ignore[no-untyped-def]
        self.calls.append(("quantize", stage))
        model.probe = ModeProbe()
        model.quant = nn.Sequential(model.probe, model.quant)
        model.hat_arithmetic = "integer" if spec.exact else "fake quant"
        return model

    @hookimpl
    def check_model(self, model, spec, example_input):  # type: ignore[no-untyped-def]
        self.calls.append(("check_model", tuple(example_input.shape)))
        return {"ok": True, "text": "all ops on BPU"}

    @hookimpl
    def export(self, model, spec, path, example_input):  # type: ignore[no-untyped-def]
        self.calls.append(("export", model.probe.mode))
        torch.save(model.state_dict(), path)
        return {"ops": 7}

    @hookimpl
    def compile(self, artifact, spec, out_dir):  # type: ignore[no-untyped-def]
        self.calls.append(("compile", artifact.name))
        (out_dir / spec.artifact).write_bytes(artifact.read_bytes())
        perf = {"march": spec.target, "input_shape": [1, 3, 32, 32], "latency_ms": 2.0, "fps": 500.0}
        (out_dir / "perf.json").write_text(json.dumps(perf))
        return perf

    @hookimpl
    def load_deployed(self, path, stage):  # type: ignore[no-untyped-def]
        self.calls.append(("load_deployed", stage))
        from hat_toy.plugin import ToyDetector

        model = ToyDetector()
        model.load_state_dict({k.replace("quant.1.", "quant."): v for k, v in
                               torch.load(path, weights_only=True).items()
                               if not k.startswith(("probe", "quant.0"))})
        return lambda batch: model.eval()(batch["img"])


@pytest.fixture
def stand_in(tmp_path):  # type: ignore[no-untyped-def]
    backend = StandIn()
    plugins = make_plugin_manager(only={"toy"}, extra=[("stand_in", backend)])
    set_plugins(plugins)
    recipe = tmp_path / "toy.toml"
    recipe.write_text(RECIPE.format(work=tmp_path / "work"))
    yield backend, recipe, tmp_path / "work"
    set_plugins(None)


def hat(*args: str) -> Any:
    from hatcore import commands  # noqa: F401
    from hatcore.cli import cli

    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result


@pytest.fixture(scope="module")
def finished(tmp_path_factory):  # type: ignore[no-untyped-def]
    """One complete `hat run` of the toy recipe with the stand-in backend."""
    tmp = tmp_path_factory.mktemp("run")
    backend = StandIn()
    set_plugins(make_plugin_manager(only={"toy"}, extra=[("stand_in", backend)]))
    recipe = tmp / "toy.toml"
    recipe.write_text(RECIPE.format(work=tmp / "work"))
    try:
        result = hat("run", str(recipe))
    finally:
        set_plugins(None)
    assert result.exit_code == 0, result.output
    return backend, result, tmp / "work"


def test_hat_run_writes_every_artifact_and_the_summary(finished) -> None:
    _, result, work = finished
    for path in ["recipe.toml", "recipe.resolved.json", "float/checkpoint-best.pt",
                 "float/checkpoint-last.pt", "float/log.jsonl", "float/metrics.json",
                 "calibration/checkpoint-best.pt", "qat/checkpoint-best.pt", "export/graph.bin",
                 "compile/program.bin", "compile/perf.json", "summary.json", "summary.md",
                 "predict/float/metrics.json", "predict/align_bpu/metrics.json"]:
        assert (work / path).exists(), path
    summary = json.loads((work / "summary.json").read_text())
    # the toy plugin's stage sits after float (its `after`), its row in table order
    assert [r["stage"] for r in summary["stages"]] == [
        "float", "toy_round", "calibration", "qat", "int_infer", "align_bpu"]
    assert "estimated on toy-chip (modelled device): 2.00 ms/frame" in result.output
    assert "| stage | AP | AP50 | Δ AP vs float | Δ AP vs previous |" in (
        work / "summary.md").read_text()
    # the exporter's and compiler's specs name their files; the core names none of them
    assert summary["artifacts"]["export/graph.bin"] == str(work / "export" / "graph.bin")
    assert summary["artifacts"]["compile/program.bin"] == str(work / "compile" / "program.bin")


def test_summary_labels_rows_evaluated_with_integer_arithmetic(finished, stand_in) -> None:
    _, _, plain = finished
    rows = {r["stage"]: r for r in json.loads((plain / "summary.json").read_text())["stages"]}
    assert rows["qat"]["arithmetic"] == "fake quant" and rows["float"]["arithmetic"] is None
    assert "| qat |" in (plain / "summary.md").read_text()
    _, recipe, work = stand_in
    assert hat("run", str(recipe), "--set", "quantize.exact=true").exit_code == 0
    rows = {r["stage"]: r for r in json.loads((work / "summary.json").read_text())["stages"]}
    assert {k: rows[k]["arithmetic"] for k in ("calibration", "qat", "int_infer", "align_bpu")
            } == {"calibration": "integer", "qat": "integer", "int_infer": None, "align_bpu": None}
    md = (work / "summary.md").read_text()
    assert "| qat (integer) |" in md and "| calibration (integer) |" in md
    assert "| int_infer |" in md and "| float |" in md


def test_summary_deltas_are_against_float_and_the_previous_row(finished) -> None:
    _, _, work = finished
    rows = json.loads((work / "summary.json").read_text())["stages"]
    aps = {}
    for r in rows:  # recompute from each row's own metrics.json, not from the summary's numbers
        aps[r["stage"]] = json.loads((work / "predict" / r["stage"] / "metrics.json").read_text())[
            "bbox"]["AP"]
    names = [r["stage"] for r in rows]
    for i, r in enumerate(rows):
        assert r["AP"] == aps[r["stage"]]
        assert r["delta_AP"] == pytest.approx(aps[r["stage"]] - aps["float"])
        prev = aps[names[i - 1]] if i else None
        assert r["delta_prev_AP"] == (None if prev is None else pytest.approx(aps[r["stage"]] - prev))


def test_hook_hat_stages_adds_a_plugin_stage_with_its_fingerprint_and_row(finished) -> None:
    from hatcore.checkpoint import load_checkpoint

    _, result, work = finished
    added = make_plugin_manager(only={"toy"}).hook.hat_stages()  # every plugin's list
    assert sorted(s.name for group in added for s in group) == [
        "calibration", "compile", "export", "float", "qat", "toy_round"]
    rounded = load_checkpoint(work / "toy_round" / "checkpoint-best.pt")["model"]
    best = load_checkpoint(work / "float" / "checkpoint-best.pt")["model"]
    w = rounded["body.0.weight"]
    assert torch.equal(w, (best["body.0.weight"] * 8).round() / 8)  # the plugin's stage ran
    assert not torch.equal(w, best["body.0.weight"])
    state = json.loads((work / "toy_round" / "stage.json").read_text())
    assert state["status"] == "done" and state["tensors"] == len(best)
    metrics = json.loads((work / "predict" / "toy_round" / "metrics.json").read_text())
    assert metrics["stage"] == "toy_round" and 0.0 <= metrics["bbox"]["AP"] <= 1.0
    assert "toy_round: rounded" in result.output


def test_hook_build_model_dataset_transform_metric_are_used_by_the_run(finished) -> None:
    _, _, work = finished
    resolved = json.loads((work / "recipe.resolved.json").read_text())["recipe"]
    assert resolved["data"]["train"]["transforms"] == [{"type": "toy_flip", "p": 0.5}]
    metrics = json.loads((work / "predict" / "float" / "metrics.json").read_text())
    assert set(metrics["bbox"]) == {"AP", "AP50"}  # the toy metric's own keys
    assert metrics["schema"] == 1 and metrics["stage"] == "float"
    # every section structured eagerly: no null for a plugin-chosen table
    assert resolved["metric"] == {"type": "toy_hits", "iou": 0.5}
    assert resolved["compile"] == {"type": "stand_in", "target": "toy-chip"}
    assert resolved["predict"]["stages"] == [
        "float", "toy_round", "calibration", "qat", "int_infer", "align_bpu"]


def test_hook_check_model_runs_first_with_the_export_shape(finished) -> None:
    backend, _, _ = finished
    assert backend.calls[0] == ("check_model", (1, 3, 32, 32))


def test_hook_quantize_prepares_calibration_then_qat(finished) -> None:
    backend, _, _ = finished
    stages = [c[1] for c in backend.calls if c[0] == "quantize"]
    assert stages[:2] == ["calibration", "qat"]


def test_hook_export_receives_the_model_in_fake_quant_mode(finished) -> None:
    backend, _, _ = finished
    assert ("export", "fake_quant") in backend.calls


def test_hook_compile_gets_the_hbir_and_its_perf_reaches_the_summary(finished) -> None:
    backend, _, work = finished
    assert ("compile", "graph.bin") in backend.calls
    assert json.loads((work / "summary.json").read_text())["device"]["latency_ms"] == 2.0


def test_hook_load_deployed_runs_int_infer_and_align_bpu(finished) -> None:
    backend, _, work = finished
    assert ("load_deployed", "int_infer") in backend.calls
    assert ("load_deployed", "align_bpu") in backend.calls
    rows = {r["stage"]: r for r in json.loads((work / "summary.json").read_text())["stages"]}
    # the stand-in runner is the qat model's own float weights: both deployed stages score alike
    assert rows["int_infer"]["AP"] == rows["align_bpu"]["AP"]


def test_calibration_observes_the_configured_batches(stand_in) -> None:
    from hatcore.checkpoint import load_checkpoint

    _, recipe, work = stand_in
    assert hat("run", str(recipe), "--stage", "float", "--stage", "calibration").exit_code == 0
    state = load_checkpoint(work / "calibration" / "checkpoint-best.pt")["model"]
    assert int(state["probe.observed"]) == 2


def test_calibration_loader_is_hats_train_images_with_val_transforms(stand_in) -> None:
    from hat_toy.plugin import ToyFlip

    from hatcore.pipeline import Pipeline
    from hatcore.stages import calibration_loader

    _, recipe, _ = stand_in
    recipe.write_text(recipe.read_text().replace("batches = 2", "steps = 2"))
    default = calibration_loader(Pipeline.load(recipe))
    assert len(default.dataset) == 16  # the training images (val has 8) ...
    assert default.dataset.transforms == []  # ... with the val transforms: no toy_flip
    assert default.batch_size == 4  # data.train.batch_size
    set_ = ("stages.calibration.transforms=train", "stages.calibration.batch_size=3",
            "stages.calibration.steps=5")
    pipe = Pipeline.load(recipe, set_)
    loader = calibration_loader(pipe)
    assert [type(t) for t in loader.dataset.transforms] == [ToyFlip]
    assert loader.batch_size == 3
    assert pipe.recipe.stages.calibration.num_steps == 5


def test_calibration_steps_and_batch_size_reach_the_observers(stand_in) -> None:
    from hatcore.checkpoint import load_checkpoint

    _, recipe, work = stand_in
    text = recipe.read_text().replace("[stages.calibration]\nbatches = 2",
                                      "[stages.calibration]\nsteps = 3\nbatch_size = 2")
    recipe.write_text(text)
    assert hat("run", str(recipe), "--stage", "float", "--stage", "calibration").exit_code == 0
    state = load_checkpoint(work / "calibration" / "checkpoint-best.pt")["model"]
    assert int(state["probe.observed"]) == 3
    metrics = json.loads((work / "calibration" / "metrics.json").read_text())
    assert metrics["calibration"]["batch_size"] == 2, metrics


def test_rerun_skips_and_a_changed_stage_reruns_with_what_follows(stand_in) -> None:
    backend, recipe, work = stand_in
    assert hat("run", str(recipe)).exit_code == 0
    float_ckpt = (work / "float" / "checkpoint-best.pt").stat().st_mtime_ns
    backend.calls.clear()
    again = hat("run", str(recipe))
    assert again.exit_code == 0
    assert "float: done, inputs unchanged, skipped" in again.output
    assert [c for c in backend.calls if c[0] != "check_model"] == []
    backend.calls.clear()
    changed = hat("run", str(recipe), "--set", "stages.qat.epochs=2")
    assert changed.exit_code == 0, changed.output
    assert "float: done, inputs unchanged, skipped" in changed.output
    assert "calibration: done, inputs unchanged, skipped" in changed.output
    assert ("quantize", "qat") in backend.calls and ("quantize", "calibration") not in backend.calls
    assert "export" in [c[0] for c in backend.calls] and "compile" in [c[0] for c in backend.calls]
    assert (work / "float" / "checkpoint-best.pt").stat().st_mtime_ns == float_ckpt
    meta = json.loads((work / "qat" / "metrics.json").read_text())
    assert meta["stage"] == "qat" and meta["train"]["epochs"] == 2  # the new run's metrics


def test_a_stage_alone_refuses_a_stale_upstream_and_the_full_run_redoes_both(stand_in) -> None:
    backend, recipe, work = stand_in
    assert hat("run", str(recipe), "--stage", "float").exit_code == 0
    changed = ("--set", "stages.float.epochs=3")  # float's inputs change; its outputs are stale
    alone = hat("run", str(recipe), *changed, "--stage", "calibration")
    assert alone.exit_code == 2, alone.output
    assert "stage 'calibration' reads stage 'float'" in alone.output
    assert "was made from other inputs" in alone.output and "--stage float" in alone.output
    assert not (work / "calibration").exists()
    row = hat("run", str(recipe), *changed, "--stage", "predict")
    assert row.exit_code == 2 and "predict row 'float' reads stage 'float'" in row.output
    backend.calls.clear()
    full = hat("run", str(recipe), *changed)
    assert full.exit_code == 0, full.output
    assert "float: done" not in full.output and ("quantize", "calibration") in backend.calls


def test_predict_command_and_missing_artifacts(stand_in) -> None:
    _, recipe, work = stand_in
    missing = hat("predict", str(recipe), "--stage", "int_infer")
    assert missing.exit_code == 2
    assert "export/graph.bin does not exist: run `hat run" in missing.output
    assert hat("run", str(recipe), "--stage", "float").exit_code == 0
    result = hat("predict", str(recipe), "--stage", "float")
    assert result.exit_code == 0, result.output
    written = json.loads((work / "predict" / "float" / "metrics.json").read_text())
    assert json.loads(result.stdout) == written["bbox"]  # what is printed is what is written
    # scored independently: the toy metric's definition applied by hand to the float model
    from hat_toy.plugin import ToyDataset, ToyDetector, box_iou

    from hatcore.checkpoint import load_checkpoint

    model = ToyDetector()
    model.load_state_dict(load_checkpoint(work / "float" / "checkpoint-best.pt")["model"])
    model.eval()
    val = ToyDataset(32, 8, 2, 1, [])
    hits = 0
    with torch.no_grad():
        for i in range(len(val)):
            item = val[i]
            batch = ToyDataset.collate_fn([item])
            det = model.postprocess(model(batch["img"]), batch)[0]
            hits += int(bool(det["labels"][0] == item["gt_labels"][0])
                        and float(box_iou(det["boxes"][:1], item["gt_boxes"][:1])[0]) >= 0.5)
    assert written["bbox"]["AP"] == pytest.approx(hits / len(val))
    bad = hat("predict", str(recipe), "--stage", "int_infer2")
    assert bad.exit_code == 2 and "'int_infer2' is not one of float, toy_round" in bad.output


def test_hook_check_model_failure_stops_before_training(stand_in) -> None:
    _, recipe, work = stand_in
    plugins = make_plugin_manager(only={"toy"}, extra=[("stand_in", _Failing())])
    set_plugins(plugins)
    result = hat("run", str(recipe))
    assert result.exit_code == 2
    assert "conv7: kernel 9x9 not supported" in result.output
    assert not (work / "float" / "checkpoint-last.pt").exists()


class _Failing(StandIn):
    @hookimpl
    def check_model(self, model, spec, example_input):  # type: ignore[no-untyped-def]
        return {"ok": False, "text": "conv7: kernel 9x9 not supported"}
