"""hat-bpu's one plugin module: every hook of the quantizer, the integer IR and the device.

* quantizer ``horizon`` (:mod:`hat_bpu.quant`): ``quantize``, QAT freezes, ``hat quant-debug``;
* exporter ``hbir`` (:mod:`hat_bpu.ir`): ``export``, ``int_infer`` through the simulator;
* compiler ``hbm`` (:mod:`hat_bpu.device`): ``check_model``, ``compile``, ``align_bpu`` through
  the runtime, ``hat check``/``hat perf``, ``describe_file``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal

import click
import torch
from torch import nn

from hat_bpu.device.march import MARCHES, get_march
from hat_bpu.ir import hbir
from hat_bpu.quant import observers
from hat_bpu.quant.prepare import QConfig, QuantModel, prepare
from hatcore import hookimpl
from hatcore.context import HatContext, pass_hat
from hatcore.errors import UserError
from hatcore.protocols import score_threshold
from hatcore.recipe import CompileSpec, ExportSpec, QuantizeSpec, TargetSpec, option, spec
from hatcore.registry import Register

DTYPE_CHOICES = ("int8", "int16", "float")
DEFAULT_MARCH = "bayes-e"


@spec
class BpuTargetSpec(TargetSpec):
    """``[target]`` with ``type = "bpu"`` (the default target): the chip and its input, stated
    once; quantize (scale policy, add rule), export (recorded in the .hbir) and compile (the
    program, refused for a .hbir of another march or scale policy) all read it."""

    march: str = option(DEFAULT_MARCH, doc=f"BPU architecture ({', '.join(MARCHES)}): its "
                        "integer arithmetic (scale policy: bernoulli power-of-two scales; add "
                        "rule), op limits and cost model (docs/bpu.md)")
    input_layout: Literal["yuv444", "nv12"] = option(
        "nv12", doc="the board's input: nv12 (the camera path; align_bpu converts each image as "
        "the device does, train with to_tensor's board_input = \"nv12\") or yuv444")


_MOVED = {"march": "[target] march", "input_layout": "[target] input_layout"}


def target_of(target: TargetSpec | None) -> BpuTargetSpec:
    """The recipe's ``[target]`` as hat-bpu reads it (the default target when None)."""
    if target is None:
        return BpuTargetSpec(type="bpu")
    if not isinstance(target, BpuTargetSpec):
        raise UserError(f"[target] type {target.type!r} is not a BPU target; hat-bpu's "
                        "quantizer, exporter and compiler need type = \"bpu\"")
    return target


@spec
class HorizonQuantizeSpec(QuantizeSpec):
    """``[quantize]`` with ``type = "horizon"`` (the default quantizer; the march it models is
    ``[target] march``)."""

    moved_keys: ClassVar[dict[str, str]] = _MOVED
    observer: str = option(
        "auto", doc="activation range observer: minmax, ma_minmax, percentile, mse, kl, auto "
        "(keeps, per tensor, the candidate of minmax/percentile/mse/kl with the best SQNR on the "
        "calibration histogram) or one a plugin adds (bpu_observers)")
    percentile: float = option(99.99, doc="percentile observer: the percentile of |x| kept")
    averaging_constant: float = option(0.1, doc="ma_minmax observer: moving-average constant")
    pow2_scales: bool | None = option(None, doc="power-of-two scales; default: the march's policy")
    overrides: dict[str, Literal["int8", "int16", "float"]] = option(
        factory=dict, doc='module-name glob → int8/int16/float, e.g. { "head.*" = "int16" }; '
        "float keeps a layer unquantized (debugging; cannot be exported)")
    type_overrides: dict[str, Literal["int8", "int16", "float"]] = option(
        factory=dict, doc='module class name → int8/int16/float, e.g. { "Conv2d" = "int16" }')
    qat_averaging: float = option(0.01, doc="QAT: moving-average constant of activation ranges "
                                  "(0 keeps the calibrated scales)")
    lsq: bool = option(False, doc="QAT: learn activation scales (LSQ) instead of averaging")
    freeze_bn_epoch: int | None = option(None, doc="QAT: from this epoch on, BN statistics are "
                                         "frozen and BN is folded as deployed (0: from the start)")
    freeze_observer_epoch: int | None = option(None, doc="QAT: from this epoch on, activation "
                                               "scales stop following the data")
    exact_eval: bool = option(False, doc="evaluate the fake-quant model with float64 "
                              "accumulation where float32 could round: its outputs then equal "
                              "the integer model's bit for bit, and the model reports "
                              "hat_arithmetic = 'integer' for its rows' label (false: fake quant "
                              "as trained; measured agreement in bench/RESULTS-quant.md)")


def march_pow2(march: str) -> bool:
    """The march's scale policy, from the march table shared with the checker and compiler.

    :raises UserError: an unknown march, naming the known ones.
    """
    from hat_bpu.device.march import get_march

    return bool(get_march(march).pow2_scales)


def qconfig_from_spec(qspec: HorizonQuantizeSpec, march: str = DEFAULT_MARCH) -> QConfig:
    """Turn the recipe table (and the target's ``march``) into the quantizer's typed settings."""
    observers.resolve(qspec.observer)
    pow2 = march_pow2(march) if qspec.pow2_scales is None else qspec.pow2_scales
    if pow2 and qspec.lsq:
        raise UserError("[quantize] lsq = true cannot learn power-of-two scales "
                        f"(march {march!r}); set lsq = false")
    return QConfig(observer=qspec.observer, pow2=pow2, overrides=dict(qspec.overrides),
                   type_overrides=dict(qspec.type_overrides), percentile=qspec.percentile,
                   averaging_constant=qspec.averaging_constant, qat_averaging=qspec.qat_averaging,
                   lsq=qspec.lsq, exact_eval=qspec.exact_eval, march=march)


def quantize_model(model: nn.Module, qspec: HorizonQuantizeSpec, stage: str,
                   march: str = DEFAULT_MARCH) -> QuantModel:
    """Prepare ``model`` for ``calibration`` or ``qat`` (see :func:`hat_bpu.quant.prepare.prepare`)."""
    if stage not in ("calibration", "qat"):
        raise ValueError(f"quantize stage must be calibration or qat, got {stage!r}")
    config = qconfig_from_spec(qspec, march)
    try:
        qm = prepare(model, config)
    except ValueError as exc:
        raise UserError(f"cannot quantize {type(model).__name__}: {exc}") from None
    except Exception as exc:  # torch.fx tracing errors
        raise UserError(f"cannot trace {type(model).__name__} with torch.fx for quantization: "
                        f"{exc}") from None
    qm.freeze_bn_epoch, qm.freeze_observer_epoch = qspec.freeze_bn_epoch, qspec.freeze_observer_epoch
    if stage == "qat":
        qm.apply_freezes(0)
    return qm


def apply_freezes(model: nn.Module, epoch: int) -> list[str]:
    """Freeze BN statistics / observers of every QuantModel in ``model`` due at ``epoch``."""
    done: list[str] = []
    for qm in [m for m in model.modules() if isinstance(m, QuantModel)]:
        done += [d for d in qm.apply_freezes(epoch) if d not in done]
    return done


@hookimpl
def hat_addhooks(pluginmanager: Any) -> None:
    """hat-bpu's own hooks (``bpu_observers``, ``bpu_marches``): :mod:`hat_bpu.hookspecs`."""
    from hat_bpu import hookspecs

    pluginmanager.add_hookspecs(hookspecs)


@hookimpl
def hat_components(register: Register) -> None:
    register("quantizer", "horizon", HorizonQuantizeSpec,
             "Horizon-style symmetric int8/int16 quantizer: fusion, observers, calibration, QAT",
             default=True)
    register("target", "bpu", BpuTargetSpec, "a Horizon-style BPU: march and board input "
             "layout", default=True)
    _deploy_components(register)


@hookimpl
def quantize(model: nn.Module, spec: QuantizeSpec, stage: str, target: TargetSpec | None
             ) -> nn.Module | None:
    if not isinstance(spec, HorizonQuantizeSpec):
        return None
    return quantize_model(model, spec, stage, target_of(target).march)


@hookimpl
def on_epoch_end(trainer: Any, epoch: int, metrics: dict[str, float]) -> None:
    if getattr(trainer, "stage", None) == "qat":
        apply_freezes(trainer.model, epoch + 1)


@hookimpl
def register_commands(cli: click.Group) -> None:
    from hat_bpu.device.commands import register

    register(cli)

    @cli.command("quant-debug")
    @click.argument("recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path))
    @click.option("--stage", type=click.Choice(["calibration", "qat"]), default="calibration",
                  show_default=True, help="whose checkpoint is compared with the float model")
    @click.option("--batches", default=2, show_default=True, help="validation batches compared")
    @click.option("--out", type=click.Path(path_type=Path), default=None,
                  help="output folder (default: WORK_DIR/quant_debug/STAGE)")
    @click.option("--integer", is_flag=True, help="also compare the integer model per layer")
    @click.option("--sensitivity", is_flag=True, help="per layer: only it quantized, and all "
                  "int8 but it int16 (ΔSQNR or ΔAP), sorted; cached")
    @click.option("--metric", type=click.Choice(["sqnr", "ap"]), default="sqnr",
                  show_default=True, help="--sensitivity: output SQNR on --batches val batches, "
                  "or AP on the whole val set (slow: two evaluations per layer)")
    @click.option("--float-reverse/--no-float-reverse", default=True, show_default=True,
                  help="--sensitivity: also all quantized but the layer float (one more pass)")
    @click.option("--set", "overrides", multiple=True, help="override a recipe value KEY=VALUE")
    @pass_hat
    def quant_debug_cmd(hat: HatContext, recipe: Path, stage: str, batches: int,
                        out: Path | None, integer: bool, sensitivity: bool, metric: str,
                        float_reverse: bool, overrides: tuple[str, ...]) -> None:
        """Per-layer float vs fake-quant similarity (cosine, SQNR, max error in LSB), or with
        --sensitivity each layer's own cost and what int16 buys."""
        if not sensitivity:
            from hat_bpu.quant.debug import debug_recipe

            click.echo(debug_recipe(hat.load(recipe, overrides), stage, batches, out, integer))
            return
        from hat_bpu.quant.sensitivity import format_sensitivity, recipe_sensitivity, write_sensitivity

        _, record, out_dir = recipe_sensitivity(hat.load(recipe, overrides), stage, metric,
                                                batches, out, float_reverse, click.echo)
        paths = write_sensitivity(record, metric, out_dir)
        click.echo(format_sensitivity(record, metric) + "\n\n"
                   + "\n".join(f"wrote {p}" for p in paths.values()))

    @cli.command("tune-precision")
    @click.argument("recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path))
    @click.option("--latency-budget-ms", type=float, required=True,
                  help="estimated latency allowed (the perf model of --march)")
    @click.option("--march", default=None, help="perf model's march (default: [target] march)")
    @click.option("--stage", type=click.Choice(["calibration", "qat"]), default="calibration",
                  show_default=True, help="whose checkpoint the sensitivity is measured on")
    @click.option("--metric", type=click.Choice(["sqnr", "ap"]), default="sqnr",
                  show_default=True, help="the sensitivity's score (see quant-debug)")
    @click.option("--batches", default=2, show_default=True, help="val batches (sqnr)")
    @click.option("--apply", "apply_", is_flag=True,
                  help="write RECIPE's copy with the chosen overrides as STEM.tuned.toml")
    @click.option("--set", "overrides", multiple=True, help="override a recipe value KEY=VALUE")
    @pass_hat
    def tune_precision_cmd(hat: HatContext, recipe: Path, latency_budget_ms: float,
                           march: str | None, stage: str, metric: str, batches: int,
                           apply_: bool, overrides: tuple[str, ...]) -> None:
        """Choose the layers that run int16 within a latency budget; print the overrides."""
        from hat_bpu.quant.precision import tune_recipe

        click.echo(tune_recipe(hat.load(recipe, overrides), recipe, latency_budget_ms, march,
                               stage, metric, batches, apply_, click.echo))



@spec
class HbirExportSpec(ExportSpec):
    """``[export]`` with ``type = "hbir"`` (the default exporter)."""

    artifact: ClassVar[str] = "model.hbir"
    moved_keys: ClassVar[dict[str, str]] = _MOVED


@spec
class HbmCompileSpec(CompileSpec):
    """``[compile]`` with ``type = "hbm"`` (the default compiler)."""

    artifact: ClassVar[str] = "model.hbm"
    moved_keys: ClassVar[dict[str, str]] = _MOVED

    opt_level: int = option(2, doc="0: one instruction per IR node, a buffer per tensor; 1: + "
                            "fusion (conv+add+relu, requantize into its producer) and buffer "
                            "reuse; 2: + elementwise outputs written in place (docs/bpu.md)")
    device_filter: bool = option(
        True, doc="filter a dense detection head's outputs on the device (DESIGN): a point leaves "
        "the device only when one of its class logits is above logit(filter_score_thr), "
        "compared in the integer domain with the output's scale; align_bpu's decoder sees "
        "only the survivors. Applies to outputs that are groups of per-level maps, class "
        "logits first (FCOS); other outputs stay dense (docs/bpu.md)")
    filter_score_thr: float | None = option(
        None, doc="device_filter: the class score a point must exceed; unset: the model's own "
        "score threshold (FCOS: the decoder's score_thr, recorded in the .hbir), else 0.05 "
        "(logit -2.944). Above the model's threshold is refused: the device would drop points "
        "the decoder keeps")


def _deploy_components(register: Register) -> None:
    register("exporter", "hbir", HbirExportSpec,
             "integer graph of the quantized model as a versioned .hbir (graph, weights, "
             "quant params)", default=True)
    register("compiler", "hbm", HbmCompileSpec,
             "modelled BPU compiler: .hbm program + per-layer performance estimate", default=True)


@hookimpl
def export(model: nn.Module, spec: ExportSpec, path: Path, example_input: torch.Tensor,
           target: TargetSpec | None) -> dict[str, Any] | None:
    if not isinstance(spec, HbirExportSpec):
        return None
    from hat_bpu.device.checker import check_scales
    from hat_bpu.quant.convert import convert

    tgt = target_of(target)
    march = get_march(tgt.march)
    graph = convert(model, example_input, march=tgt.march)
    problems = check_scales(graph, march)
    if problems:
        raise UserError(f"the quantized model cannot be exported for {march.name}:\n  "
                        + "\n  ".join(problems))
    graph.meta["input_layout"] = tgt.input_layout
    thr = score_threshold(model)
    if thr is not None:  # the device filter follows it (compile)
        graph.meta["score_threshold"] = thr
    return hbir.save_hbir(graph, Path(path))


@hookimpl
def check_model(model: nn.Module, spec: CompileSpec, example_input: torch.Tensor,
                target: TargetSpec | None) -> dict[str, Any] | None:
    if not isinstance(spec, HbmCompileSpec):
        return None
    from hat_bpu.device.checker import check

    march = target_of(target).march
    return {"target": march, **check(model, get_march(march), example_input[:1])}


def check_built_for(graph_meta: dict[str, Any], march_name: str, where: str) -> None:
    """Refuse a graph built for another march or scale policy than ``march_name``'s.

    :raises UserError: naming the graph's march / policy and the target's.
    """
    built = graph_meta.get("march")
    if built is not None and built != march_name:
        raise UserError(f"{where} was built for march {built!r}, but [target] march is "
                        f"{march_name!r}: quantize and export again for {march_name!r} (or set "
                        f"[target] march = {built!r})")
    pow2 = graph_meta.get("pow2_scales")
    if pow2 is not None and not pow2 and get_march(march_name).pow2_scales:
        raise UserError(f"{where} has multiplier-based scales (scale policy 'multiplier'), but "
                        f"march {march_name!r} takes only power-of-two scales (scale policy "
                        "'pow2'): quantize again with [quantize] pow2_scales unset or true")




@hookimpl
def compile(artifact: Path, spec: CompileSpec, out_dir: Path, target: TargetSpec | None
            ) -> dict[str, Any] | None:
    if not isinstance(spec, HbmCompileSpec):
        return None
    from hat_bpu.device.hbm import compile_file

    tgt = target_of(target)
    if not hbir.is_hbir(Path(artifact)):
        raise UserError(f"{artifact}: not an .hbir file; run the export stage first")
    graph = hbir.load_hbir(Path(artifact))
    check_built_for(graph.meta, tgt.march, str(artifact))
    thr = filter_threshold(spec.filter_score_thr, graph.meta.get("score_threshold"))
    estimate = compile_file(Path(artifact), tgt.march, Path(out_dir), spec.opt_level,
                            tgt.input_layout)
    filt = None
    if spec.device_filter and thr > 0:
        from hat_bpu.device.filter import plan

        filt = plan(graph, thr)
    _set_device_filter(Path(out_dir) / HbmCompileSpec.artifact, filt)
    estimate["device_filter"] = None if filt is None else {
        "score_thr": filt["score_thr"], "threshold": filt["threshold"]}
    return estimate


def filter_threshold(asked: float | None, model_thr: float | None) -> float:
    """The device filter's score threshold: ``[compile] filter_score_thr`` when set, else the
    model's own (recorded at export; 0: the decoder keeps every point, nothing is filtered),
    else 0.05.

    :raises UserError: a threshold outside (0, 1), or above the model's own (the device would
        drop points the host's decoder keeps; naming both).
    """
    from hat_bpu.device.filter import DEFAULT_SCORE_THR

    if asked is None:
        return DEFAULT_SCORE_THR if model_thr is None else float(model_thr)
    thr = float(asked)
    if not 0 < thr < 1:
        raise UserError(f"[compile] filter_score_thr must lie in (0, 1), got {thr}")
    if model_thr is not None and thr > model_thr:
        raise UserError(f"[compile] filter_score_thr = {thr} is above the model's own score "
                        f"threshold {model_thr} (FCOS: [model.decoder] score_thr): the device "
                        f"would drop points the decoder keeps; set it to {model_thr} or lower, "
                        "or leave it unset to follow the model")
    return thr


def _set_device_filter(path: Path, filt: dict[str, Any] | None) -> None:
    """Record the device-side filter in the ``.hbm`` header (``device_filter``; None: off)."""
    from hat_bpu.device import hbm

    _, header, body = hbir.read_container(path, hbm.MAGIC, (hbm.HBM_VERSION,))
    header = {k: v for k, v in header.items() if k not in ("body_len", "body_sha256")}
    hbir.write_container(path, hbm.MAGIC, hbm.HBM_VERSION, {**header, "device_filter": filt},
                         body)


def filtered_runner(path: Path, runner: Callable[[Any], Any],
                    filt: dict[str, Any] | None = None) -> Callable[[Any], Any]:
    """``runner`` (the board: batch → output tree) with the ``.hbm``'s device-side filter
    (:mod:`hat_bpu.device.filter`; ``filt``: another plan instead) between the runtime's
    outputs and the host's decoder; the runner's ``stats`` counts survivors and DDR bytes
    dense vs filtered."""
    from torch.utils import _pytree as pytree

    from hat_bpu.device import filter as devfilter
    from hat_bpu.device import hbm

    if filt is None:
        _, header, _ = hbir.read_container(Path(path), hbm.MAGIC, (hbm.HBM_VERSION,))
        filt = header.get("device_filter")
    if not filt:
        return runner
    stats = {"images": 0, "points": 0, "survivors": 0, "dense_bytes": 0, "filtered_bytes": 0}

    def run(batch: Any) -> Any:
        flat, tree = pytree.tree_flatten(runner(batch))
        device = flat[0].device
        q = devfilter.to_integers([t.cpu() for t in flat], filt)
        kept = devfilter.Survivors(q, filt)
        stats["images"] += kept.batch
        stats["points"] += sum(int(q[i][:, 0].numel()) for i in filt["groups"][0])
        stats["survivors"] += kept.count()
        stats["dense_bytes"] += devfilter.dense_nbytes(q, filt)
        stats["filtered_bytes"] += kept.nbytes()
        return pytree.tree_unflatten([t.to(device) for t in kept.to_dense()], tree)

    run.stats = stats  # type: ignore[attr-defined]
    return run


def _batch_img(batch: Any) -> torch.Tensor:
    img = batch["img"] if isinstance(batch, dict) else batch
    if not isinstance(img, torch.Tensor) or img.dim() != 4:
        raise UserError("a deployed runner needs batch['img'] as Tensor[B, 3, H, W]")
    return img


def _to_device(tree: Any, device: torch.device) -> Any:
    from torch.utils import _pytree as pytree

    return pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, tree)


@hookimpl
def load_deployed(path: Path, stage: str) -> Callable[[Any], Any] | None:
    path = Path(path)
    if stage == "int_infer" and hbir.is_hbir(path):
        from hat_bpu.device.runtime import plain_tree
        from hat_bpu.ir.simulator import Simulator

        sim = Simulator(hbir.load_hbir(path))

        def run_int(batch: Any) -> Any:
            img = _batch_img(batch)
            return _to_device(plain_tree(sim(img)), img.device)
        return run_int
    if stage == "align_bpu" and _is_hbm(path):
        from hat_bpu.device.runtime import board_runner

        return filtered_runner(path, board_runner(path))
    return None


def _is_hbm(path: Path) -> bool:
    try:
        from hat_bpu.device.hbm import is_hbm
    except ImportError:
        return False
    return is_hbm(path)


@hookimpl
def describe_file(path: Path) -> str | None:
    path = Path(path)
    if not path.is_file():
        return None
    if hbir.is_hbir(path):
        graph = hbir.load_hbir(path)
        return (f"{path}: HBIR v{hbir.HBIR_VERSION} integer graph (checksum ok)\n"
                + hbir.describe_graph(graph))
    if _is_hbm(path):
        from hat_bpu.device.hbm import describe_hbm

        return describe_hbm(path)
    return None


@hookimpl
def report_sections(work_dir: Path, summary: dict[str, Any]) -> list[Any]:
    """The device estimate and quant-debug's worst layers in ``report.html`` (hat_bpu.report)."""
    from hat_bpu.report import sections

    return sections(work_dir)
