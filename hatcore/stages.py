"""What each stage of ``hat run`` does, in order, skipping what is done (see pipeline.py)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from hatcore import distributed as dist
from hatcore import quant
from hatcore.checkpoint import load_checkpoint, save_checkpoint
from hatcore.errors import UserError
from hatcore.pipeline import (
    ALL_STAGES,
    TRAIN_STAGES,
    Pipeline,
    StageState,
    echo,
    flat_metrics,
    read_json,
    write_json,
)
from hatcore.recipe import fingerprint
from hatcore.trainer import seed_everything

# which trained stage's weights each predict stage scores
PREDICT_SOURCE = {"float": "float", "calibration": "calibration", "qat": "qat",
                  "int_infer": "export", "align_bpu": "compile"}


class StageRunner:
    """Runs a pipeline's stages; each ``run_<stage>`` is skip-if-done and resumable."""

    def __init__(self, pipe: Pipeline) -> None:
        self.pipe = pipe
        self.recipe = pipe.recipe
        self.work = pipe.work_dir
        self.fps = self._fingerprints()
        self.ran: list[str] = []  # stages that did work in this invocation

    def _fingerprints(self) -> dict[str, str]:
        r = self.pipe.resolved
        st = r["stages"]
        fps = {"float": fingerprint([r["task"]["seed"], r["model"], r["data"], r["metric"],
                                     st["float"]])}
        fps["calibration"] = fingerprint([fps["float"], r["quantize"], st["calibration"]])
        fps["qat"] = fingerprint([fps["calibration"], st["qat"]])
        fps["export"] = fingerprint([fps[self.deploy_source()], r["export"]])
        fps["compile"] = fingerprint([fps["export"], r["compile"]])
        for name, source in PREDICT_SOURCE.items():
            fps[f"predict/{name}"] = fingerprint([fps[source], r["data"]["val"], r["metric"]])
        return fps

    def deploy_source(self) -> str:
        """The quantized stage whose weights are exported: qat, or calibration without QAT."""
        return "qat" if self.recipe.stages.qat.enabled else "calibration"

    def enabled(self, stage: str) -> bool:
        stages = self.recipe.stages
        if stage in TRAIN_STAGES:
            return bool(getattr(stages, stage).enabled)
        if stage in ("export", "compile"):
            return stages.calibration.enabled or stages.qat.enabled
        return True

    # ------------------------------------------------------------------ the whole chain

    def run(self, only: list[str] | None = None) -> None:
        for name in only or []:
            if name not in ALL_STAGES:
                raise UserError(f"--stage {name!r} is not a stage; valid: {', '.join(ALL_STAGES)}")
        todo = [s for s in ALL_STAGES if not only or s in only]
        if dist.is_main():
            self._save_recipe()
        if not only or "float" in todo:
            self.check()
        for stage in todo:
            if stage == "predict":
                for p in self.recipe.predict.stages:
                    if self.enabled(PREDICT_SOURCE[p]):
                        self.run_predict(p)
            elif not self.enabled(stage):
                echo(f"{stage}: disabled in the recipe, skipped")
            else:
                getattr(self, f"run_{stage}")()
            dist.barrier()

    def _save_recipe(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        text = self.pipe.source.read_text()
        if self.pipe.overrides:
            text += "\n# overridden on the command line:\n" + "".join(
                f"#   --set {o}\n" for o in self.pipe.overrides)
        (self.work / "recipe.toml").write_text(text)
        write_json(self.work / "recipe.resolved.json",
                   {"source": str(self.pipe.source), "overrides": list(self.pipe.overrides),
                    "recipe": self.pipe.resolved})

    def check(self) -> None:
        """The BPU model checker, before any training (when a checker plugin is installed)."""
        if not self.pipe.hook.check_model.get_hookimpls() or not self.enabled("compile"):
            return
        spec = self.pipe.section("compile")
        model = self.pipe.build_model().eval()
        report = self.pipe.hook.check_model(model=model, spec=spec,
                                            example_input=self.pipe.example_input())
        if report is None:
            return
        if not report.get("ok", False):
            raise UserError(f"the model cannot be deployed on {spec.march}:\n{report.get('text', '')}"
                            "\nfix the model or choose another march before training")
        echo(f"check: the model is deployable on {spec.march}")

    # ------------------------------------------------------------------ stages

    def _state(self, stage: str) -> StageState | None:
        state = StageState(self.work / stage, self.fps[stage])
        if state.done():
            echo(f"{stage}: done, inputs unchanged, skipped")
            return None
        if state.start():
            echo(f"{stage}: continuing an interrupted run")
        seed_everything(self.recipe.task.seed)  # a redone stage builds and draws the same
        self.ran.append(stage)
        return state

    def _evaluator(self, train_mode: str | None = None) -> Any:
        def evaluate(model: torch.nn.Module) -> dict[str, float]:
            if not dist.is_main():
                return {}
            if train_mode:
                quant.set_mode(model, "fake_quant")
            try:
                return flat_metrics(self.pipe.evaluate(model, device=self.pipe.device))
            finally:
                if train_mode:
                    quant.set_mode(model, train_mode)
        return evaluate

    def _train(self, stage: str, model: torch.nn.Module, train_mode: str | None) -> dict[str, Any]:
        from hatcore.trainer import Trainer

        trainer = Trainer(
            stage=stage, model=model, cfg=getattr(self.recipe.stages, stage),
            train_loader=self.pipe.loader("train", distributed=dist.world_size() > 1),
            out_dir=self.work / stage, device=self.pipe.device,
            evaluate=self._evaluator(train_mode) if getattr(self.recipe.stages, stage).val_interval
            else None, best_key="AP", hook=self.pipe.hook,
            seed=self.recipe.task.seed,
        )
        result: dict[str, Any] = trainer.fit()
        return result

    def run_float(self) -> None:
        state = self._state("float")
        if state is None:
            return
        echo("float: training the floating-point model")
        metrics = self._train("float", self.pipe.build_model(), None)
        state.finish(metrics=metrics)

    def run_calibration(self) -> None:
        from hatcore.trainer import calibrate

        state = self._state("calibration")
        if state is None:
            return
        cfg = self.recipe.stages.calibration
        model = self.pipe.load_stage_model("float")
        spec = self.pipe.section("quantize")
        model = self.pipe.need(self.pipe.hook.quantize(model=model, spec=spec,
                                                        stage="calibration"), "quantizer", spec.type)
        model.to(self.pipe.device).eval()
        echo(f"calibration: observing {cfg.batches} batches")
        quant.set_mode(model, "observe")
        calibrate(model, self.pipe.loader("train"), batches=cfg.batches, device=self.pipe.device,
                  seed=self.recipe.task.seed)
        quant.set_mode(model, "fake_quant")
        out = self.work / "calibration"
        if dist.is_main():  # scored by `predict calibration`, not twice
            payload = {"model": model.state_dict(), "stage": "calibration", "epoch": 0}
            save_checkpoint(out / "checkpoint-last.pt", payload)
            save_checkpoint(out / "checkpoint-best.pt", payload)
            write_json(out / "metrics.json", {"batches": cfg.batches})
        state.finish()

    def run_qat(self) -> None:
        state = self._state("qat")
        if state is None:
            return
        model = self.pipe.quantized_model("qat")
        model.load_state_dict(load_checkpoint(self.pipe.stage_checkpoint("calibration"))["model"])
        quant.set_mode(model, "qat")
        echo("qat: quantization-aware fine-tuning")
        metrics = self._train("qat", model, "qat")
        state.finish(metrics=metrics)

    def run_export(self) -> None:
        state = self._state("export")
        if state is None:
            return
        source = self.deploy_source()
        model = self.pipe.load_stage_model(source).cpu().eval()
        path = self.work / "export" / "model.hbir"
        path.parent.mkdir(parents=True, exist_ok=True)
        spec = self.pipe.section("export")
        t0 = time.perf_counter()
        desc = self.pipe.hook.export(model=model, spec=spec, path=path,
                                     example_input=self.pipe.example_input())
        if desc is None:
            raise UserError(f"no installed plugin exports type {spec.type!r} (pip install hat-bpu)")
        echo(f"export: wrote {path} from the {source} model in {time.perf_counter() - t0:.1f}s")
        write_json(self.work / "export" / "export.json", desc)
        state.finish(source=source)

    def run_compile(self) -> None:
        state = self._state("compile")
        if state is None:
            return
        artifact = self.work / "export" / "model.hbir"
        if not artifact.is_file():
            raise UserError(f"{artifact} does not exist: run `hat run {self.pipe.source} "
                            "--stage export` first")
        spec = self.pipe.section("compile")
        perf = self.pipe.hook.compile(artifact=artifact, spec=spec, out_dir=self.work / "compile")
        if perf is None:
            raise UserError(f"no installed plugin compiles type {spec.type!r} (pip install hat-bpu)")
        echo(f"compile: {self.work / 'compile' / 'model.hbm'} — estimated "
             f"{perf.get('latency_ms', float('nan')):.2f} ms/frame on {spec.march} (modelled device)")
        state.finish(latency_ms=perf.get("latency_ms"))

    def run_predict(self, stage: str, ckpt: Path | None = None) -> dict[str, Any]:
        key = f"predict/{stage}"
        out = self.work / "predict" / stage
        state = StageState(out, self.fps[key])
        if ckpt is None and state.done():
            echo(f"predict {stage}: done, inputs unchanged, skipped")
            return read_json(out / "metrics.json") or {}
        if not dist.is_main():
            return {}
        state.start()
        self.ran.append(key)
        model, runner = self.pipe.predictor(stage, ckpt)
        deployed = stage in ("int_infer", "align_bpu")
        device = torch.device("cpu") if deployed else self.pipe.device
        echo(f"predict {stage}: scoring the val set")
        result = self.pipe.evaluate(model.to(device), runner, out_dir=out, device=device,
                                    desc=f"predict {stage}")
        flat = flat_metrics(result)
        echo(f"predict {stage}: AP {flat.get('AP', float('nan')):.4f}  "
             f"AP50 {flat.get('AP50', float('nan')):.4f}")
        if ckpt is None:
            state.finish(metrics=flat)
        return result
