"""The plugin contract: every hook HAT calls, who calls it, when, and what a plugin returns.

A plugin implements any subset of these with ``@hatcore.hookimpl``; pluggy checks each
implementation's signature against the spec below when the plugin is registered. Hooks are
always called with keyword arguments, so an implementation may accept only the ones it needs.

Shared vocabulary (defined in the core so plugins never import each other):

* recipe specs: ``hatcore.recipe`` (``ModelSpec``, ``DatasetSpec`` ... and ``spec``/``option``),
* the batch a dataset yields and a model consumes: ``hatcore.data.Batch``,
* quantization boundaries and hints a model gives a quantizer: ``hatcore.quant``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import click
    import torch
    from torch import nn
    from torch.utils.data import Dataset

    from hatcore.data import Batch, Detections
    from hatcore.plugins import Plugins
    from hatcore.protocols import Metric, Trainer
    from hatcore.recipe import (
        CompileSpec,
        DatasetSpec,
        ExportSpec,
        MetricSpec,
        ModelSpec,
        QuantizeSpec,
        TargetSpec,
        TransformSpec,
    )
    from hatcore.registry import Register
    from hatcore.report import Section
    from hatcore.stages import Stage

hookspec = pluggy.HookspecMarker("hat")


@hookspec(historic=True)
def hat_addhooks(pluginmanager: pluggy.PluginManager) -> None:
    """Add a plugin's own hook specs (``pluginmanager.add_hookspecs(module)``).

    Called once per plugin right after loading, before any other hook (as pytest's
    ``pytest_addhooks``). hat-fcos uses it for ``build_backbone``/``build_neck``/``build_head``,
    so a third-party plugin can add a backbone without touching hat-fcos.

    :param pluginmanager: the pluggy plugin manager.
    """


@hookspec
def hat_components(register: Register) -> None:
    """Declare the recipe ``type`` names this plugin provides.

    Called once, when the plugin manager is built, for every plugin. Each call of
    ``register(kind, name, spec_cls, doc=..., default=...)`` claims one name; two plugins
    claiming the same ``(kind, name)`` is an error naming both. The table drives recipe
    validation (the attrs class ``spec_cls`` structures the recipe table), dispatch (the core
    calls ``build_*``/``quantize``/``export``/``compile`` only on the plugin that registered the
    spec's type, so an implementation need not check the spec's class), ``hat plugins`` and
    "did you mean" messages. ``default=True`` makes the name its kind's default: a recipe
    without that table (``[quantize]`` ...) gets this type; one default per kind.

    :param register: callable ``register(kind: str, name: str, spec_cls: type, doc: str = "",
        *, default: bool = False)``. Kinds used by the core: ``model``, ``dataset``,
        ``transform``, ``metric``, ``quantizer``, ``exporter``, ``compiler``; plugins may add
        their own (hat-fcos: ``backbone``, ``neck``, ``head``).
    """


@hookspec
def hat_stages() -> list[Stage]:
    """Add stages to the stage table (:mod:`hatcore.stages`).

    Called when a run is set up and for ``hat run --stage`` / ``hat predict --stage`` choices.
    The core's built-in plugin returns float, calibration, qat, export and compile; a plugin's
    stage says where it goes (``Stage.after``), what it reads (its fingerprint), what it writes
    and, with ``Stage.predict``, the predict row (and summary row) scoring its output. Its
    ``run(pipe, stage)`` gets the run (build_model, loader, workdir ...), never a global.

    :returns: the stages this plugin adds, in order.
    """
    return []


@hookspec(firstresult=True)
def build_model(spec: ModelSpec, plugins: Plugins) -> nn.Module | None:
    """Build the float model for ``spec.type``.

    Called by the pipeline at the start of every stage (and by ``hat infer``, ``hat calops`` ...),
    only on the plugin that registered ``spec.type``. The returned module is a
    :class:`hatcore.protocols.TaskModel`: ``forward(img) -> raw``,
    ``compute_loss(raw, batch) -> dict[str, Tensor]``,
    ``postprocess(raw, batch) -> list[Detections]`` (checked when built).

    :param spec: the structured ``[model]`` table, an instance of the class the plugin registered.
    :param plugins: the plugin manager this call runs under (``plugins.hook`` for a plugin's own
        hooks, e.g. hat-fcos's ``build_backbone``); never fetch a process-global one.
    :returns: the model.
    """


@hookspec(firstresult=True)
def build_dataset(
    spec: DatasetSpec, split: str, transforms: list[Callable[[dict[str, Any]], dict[str, Any]]]
) -> Dataset[Any] | None:
    """Build a dataset for ``spec.type``.

    Called by the pipeline for ``[data.train]`` (split ``"train"``) and ``[data.val]``
    (``"val"``). Items are dicts (see :mod:`hatcore.data`); the core wraps the dataset in a
    DataLoader using ``spec.batch_size``, ``spec.num_workers`` and the dataset's ``collate_fn``
    attribute when it has one. The dataset should expose ``class_names: list[str]``.
    Stops at the first non-None result.

    :param spec: the structured ``[data.<split>]`` table.
    :param split: ``"train"`` or ``"val"``.
    :param transforms: the built ``spec.transforms``, applied in order to each sample.
    :returns: the dataset, or None when ``spec.type`` is not this plugin's.
    """


@hookspec(firstresult=True)
def build_transform(spec: TransformSpec) -> Callable[[dict[str, Any]], dict[str, Any]] | None:
    """Build one data transform (a callable on a sample dict) for ``spec.type``.

    Called by the pipeline for each entry of a dataset's ``transforms`` list, before
    ``build_dataset``. Stops at the first non-None result.

    :param spec: one structured entry of ``transforms = [...]``.
    :returns: the transform, or None when ``spec.type`` is not this plugin's.
    """


@hookspec(firstresult=True)
def build_metric(spec: MetricSpec, dataset: Dataset[Any]) -> Metric | None:
    """Build an evaluator for ``spec.type`` over ``dataset`` (the validation set).

    Called by the pipeline for every validation and every ``predict``. The object is a
    :class:`hatcore.protocols.Metric`: ``reset()``, ``update(detections, batch)`` and
    ``compute(out_dir: Path | None) -> dict[str, dict[str, float]]`` (for example
    ``{"bbox": {"AP": 0.41, ...}}``, values in 0..1), which, when ``out_dir`` is given, writes
    ``detections.json`` there; the core writes ``metrics.json`` from the returned tables (one
    schema, docs/formats.md). Under torch.distributed it gathers to rank 0.
    Stops at the first non-None result.

    :param spec: the structured ``[metric]`` table.
    :param dataset: the validation dataset the detections refer to.
    :returns: the metric, or None when ``spec.type`` is not this plugin's.
    """


@hookspec(firstresult=True)
def quantize(model: nn.Module, spec: QuantizeSpec, stage: str, target: TargetSpec | None
             ) -> nn.Module | None:
    """Prepare a float model for a quantized stage.

    Called by the pipeline at the start of ``calibration`` (on the best float weights) and
    ``qat`` (on a model prepared the same way, then loaded with the calibration checkpoint).
    The quantizer fuses, places observers / fake quant as ``hatcore.quant`` hints ask and
    returns a module with the same ``forward`` contract; ``hatcore.quant.set_mode`` switches
    it between observing and fake-quant. Stops at the first non-None result.

    :param model: the float model (eval mode, float weights loaded).
    :param spec: the structured ``[quantize]`` table.
    :param stage: ``"calibration"`` or ``"qat"``.
    :param target: the structured ``[target]`` table (the device: its chip and input layout),
        None when no installed plugin provides one.
    :returns: the prepared model, or None when ``spec.type`` is not this plugin's.
    """


@hookspec(firstresult=True)
def export(
    model: nn.Module, spec: ExportSpec, path: Path, example_input: torch.Tensor,
    target: TargetSpec | None
) -> dict[str, Any] | None:
    """Write the deployable fixed-point model of a quantized model (the exporter's file).

    Called by the pipeline's ``export`` stage with the best QAT model (calibration model when
    QAT is disabled) in eval mode and fake-quant mode. Stops at the first non-None result.

    :param model: the quantized model, as returned by ``quantize`` and trained.
    :param spec: the structured ``[export]`` table.
    :param path: where to write the file (``work_dir/export/<spec.artifact>``: the exporter's
        spec class names its file).
    :param example_input: an input of the deployed shape, ``Tensor[1, 3, H, W]``.
    :param target: the structured ``[target]`` table (the device: its chip and input layout),
        None when no installed plugin provides one.
    :returns: a JSON-able description (ops, tensors, sizes) or None when not this plugin's.
    """


@hookspec(firstresult=True)
def compile(artifact: Path, spec: CompileSpec, out_dir: Path, target: TargetSpec | None
            ) -> dict[str, Any] | None:
    """Check and compile an exported model for the device.

    Called by the pipeline's ``compile`` stage with the export stage's file. Writes
    ``spec.artifact`` (the compiled program), ``perf.json`` and ``perf.html`` into ``out_dir``.
    Stops at the first non-None result.

    :param artifact: the exported model file.
    :param spec: the structured ``[compile]`` table.
    :param out_dir: ``work_dir/compile``.
    :param target: the structured ``[target]`` table (the device the artifact must have been
        built for: its chip and input layout), None when no installed plugin provides one.
    :returns: the performance estimate (``perf.json`` contents: ``march`` (the target),
        ``latency_ms``, ``fps``, ...) or None when not this plugin's.
    """


@hookspec(firstresult=True)
def check_model(
    model: nn.Module, spec: CompileSpec, example_input: torch.Tensor,
    target: TargetSpec | None
) -> dict[str, Any] | None:
    """Check that a float model can be deployed, before any training.

    Called by ``hat run`` before the first stage (and by ``hat check``). Stops at the first
    non-None result.

    :param model: the float model.
    :param spec: the structured ``[compile]`` table (it decides the limits).
    :param example_input: an input of the deployed shape.
    :param target: the structured ``[target]`` table (the device: its chip and input layout),
        None when no installed plugin provides one.
    :returns: ``{"ok": bool, "text": str, "target": str, ...}`` (a printable per-op report; the
        target's name for messages) or None.
    """


@hookspec(firstresult=True)
def load_deployed(path: Path, stage: str) -> Callable[[Batch], Any] | None:
    """Load a deployed artifact as a runner for prediction.

    Called by ``hat predict --stage int_infer`` (``path`` is the export stage's file) and
    ``--stage align_bpu`` (the compile stage's file), and for a plugin stage's row that uses
    :func:`hatcore.stages.load_deployed`. The runner maps a batch to the same ``raw``
    outputs the float model's ``forward`` returns (dequantized to float), so the model's own
    ``postprocess`` decodes them. Stops at the first non-None result.

    :param path: the artifact.
    :param stage: the predict row: ``"int_infer"``, ``"align_bpu"`` or a plugin's.
    :returns: the runner, or None when the file is not this plugin's.
    """


@hookspec(firstresult=True)
def describe_file(path: Path) -> str | None:
    """Describe and verify a file this plugin writes (``hat info FILE``).

    Called for every ``hat info``; a plugin that does not recognise the file returns None.
    A damaged file raises ``hatcore.errors.UserError`` naming what is wrong (checksum,
    truncation). Stops at the first non-None result.

    :param path: the file or directory (an LMDB folder) to describe.
    :returns: a human-readable description, or None.
    """


@hookspec(firstresult=True)
def draw_detections(
    batch: Batch, detections: list[Detections], class_names: list[str], paths: list[Path],
    score_thr: float,
) -> bool | None:
    """Draw each image of ``batch`` with its detections (boxes, class names, scores) as a PNG.

    Called by ``hat run`` after prediction (``work_dir/vis/``). The plugin that owns the data
    (it knows where the original image is: ``batch["meta"][i]``) draws on the original image.
    Stops at the first non-None result.

    :param batch: a collated validation batch.
    :param detections: the model's ``postprocess`` output for it (original-image coordinates).
    :param class_names: the dataset's class names, indexed by label.
    :param paths: one output PNG path per image.
    :param score_thr: detections below this score are not drawn.
    :returns: True when drawn, None when this plugin cannot draw this batch.
    """


@hookspec(firstresult=True)
def draw_comparison(
    dataset: Dataset[Any], detections: dict[str, list[dict[str, Any]]], out_dir: Path, n: int,
    score_thr: float,
) -> list[Path] | None:
    """Draw the ground truth beside several predict rows' detections on the same images.

    Called at the end of ``hat run`` with the first predict row (the float model) and the last
    deployed one, read from ``predict/<row>/detections.json``; the images go to
    ``work_dir/vis/compare/`` and into ``report.html``. The plugin that owns the dataset (it
    knows the original images and the ground truth) draws; labels must stay inside the image.
    Stops at the first non-None result.

    :param dataset: the validation dataset the detections refer to.
    :param detections: predict row -> its detections, as the metric wrote them.
    :param out_dir: the folder to write the pictures into (created by the plugin).
    :param n: how many images (``predict.vis_images``), the first ones of ``dataset``.
    :param score_thr: detections below this score are not drawn.
    :returns: the pictures written (PNG or JPEG), or None when this plugin cannot draw
        ``dataset``.
    """


@hookspec
def report_sections(work_dir: Path, summary: dict[str, Any]) -> list[Section]:
    """Add sections to the run's ``report.html`` (:mod:`hatcore.report`).

    Called for every plugin when the report is written: at the end of ``hat run`` and by
    ``hat report``. A plugin reads the files its own hooks wrote into the work dir (a metric's
    per-class results, a compiler's performance estimate ...) and returns sections; it returns
    ``[]`` when it finds none of its files. The core's own sections are the stage table (order
    10), the training curves (20), the drawings (60) and the resolved recipe (90).

    :param work_dir: the run's work dir.
    :param summary: ``summary.json`` of the run (its ``stages`` rows name the predict rows
        that have results, in table order).
    :returns: :class:`hatcore.report.Section` objects (``id``, ``title``, ``html``, ``order``).
    """
    return []


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add commands to the ``hat`` command line (``hat pack``, ``hat check`` ...).

    Called once when the CLI starts, for every plugin (the core's own commands come from its
    built-in plugin the same way). A command gets the run context as click's ``ctx.obj``
    (decorate it with ``hatcore.context.pass_hat``; ``hat.load(recipe, overrides)`` gives the
    recipe's run) and never imports the pipeline.

    :param cli: the root ``click.Group``; call ``cli.add_command(...)`` or use ``@cli.command()``.
    """


@hookspec
def on_epoch_end(trainer: Trainer, epoch: int, metrics: dict[str, float]) -> None:
    """Run after every training epoch (float and qat), validation included.

    Called by :class:`hatcore.trainer.Trainer` on every rank, for every plugin. Used for
    logging and bookkeeping; set ``trainer.should_stop = True`` to stop early.

    :param trainer: the running trainer, a :class:`hatcore.protocols.Trainer` (``stage``,
        ``model``, ``out_dir``, ``cfg``, ``should_stop``).
    :param epoch: the epoch just finished, counting from 0.
    :param metrics: the epoch's averaged losses, learning rate and validation metrics.
    """


@hookspec
def on_iter_end(trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
    """Run after every training iteration (float and qat).

    Called by :class:`hatcore.trainer.Trainer` on rank 0 only, for every plugin, after the
    optimizer step. Used for per-iteration logging (the built-in callbacks: TensorBoard
    scalars, and a console line every ``log_interval`` iterations when stderr is not a
    terminal). Keep it cheap: it runs once per batch.

    :param trainer: the running trainer (``stage``, ``epoch``, ``iters_per_epoch``, ``cfg``,
        ``out_dir``).
    :param step: the global iteration count of the stage, after this iteration (from 1).
    :param metrics: this iteration's losses (``loss`` is their sum), ``lr`` and ``img_s``.
    """
