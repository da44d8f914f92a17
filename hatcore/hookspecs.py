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
    from hatcore.recipe import (
        CompileSpec,
        DatasetSpec,
        ExportSpec,
        MetricSpec,
        ModelSpec,
        QuantizeSpec,
        TransformSpec,
    )
    from hatcore.registry import Register

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
    ``register(kind, name, spec_cls, doc=...)`` claims one name; two plugins claiming the same
    ``(kind, name)`` is an error naming both. The table drives recipe validation (the attrs class
    ``spec_cls`` structures the recipe table), ``hat plugins`` and "did you mean" messages.

    :param register: callable ``register(kind: str, name: str, spec_cls: type, doc: str = "")``.
        Kinds used by the core: ``model``, ``dataset``, ``transform``, ``metric``,
        ``quantizer``, ``exporter``, ``compiler``; plugins may add their own (hat-fcos:
        ``backbone``, ``neck``, ``head``).
    """


@hookspec(firstresult=True)
def build_model(spec: ModelSpec) -> nn.Module | None:
    """Build the float model for ``spec.type``.

    Called by the pipeline at the start of every stage (and by ``hat infer``, ``hat calops`` ...).
    The returned module follows the task-model contract of :mod:`hatcore.data`:
    ``forward(img) -> raw``, ``compute_loss(raw, batch) -> dict[str, Tensor]``,
    ``postprocess(raw, batch) -> list[Detections]``. Stops at the first non-None result.

    :param spec: the structured ``[model]`` table, an instance of the class the plugin registered.
    :returns: the model, or None when ``spec.type`` is not this plugin's.
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
def build_metric(spec: MetricSpec, dataset: Dataset[Any]) -> Any | None:
    """Build an evaluator for ``spec.type`` over ``dataset`` (the validation set).

    Called by the pipeline for every validation and every ``predict``. The object has
    ``reset()``, ``update(detections: list[Detections], batch: Batch)`` and
    ``compute(out_dir: Path | None) -> dict[str, dict[str, float]]`` (for example
    ``{"bbox": {"AP": 0.41, ...}}``, values in 0..1), which, when ``out_dir`` is given, writes
    ``detections.json`` and ``metrics.json`` there. Under torch.distributed it gathers to rank 0.
    Stops at the first non-None result.

    :param spec: the structured ``[metric]`` table.
    :param dataset: the validation dataset the detections refer to.
    :returns: the metric, or None when ``spec.type`` is not this plugin's.
    """


@hookspec(firstresult=True)
def quantize(model: nn.Module, spec: QuantizeSpec, stage: str) -> nn.Module | None:
    """Prepare a float model for a quantized stage.

    Called by the pipeline at the start of ``calibration`` (on the best float weights) and
    ``qat`` (on a model prepared the same way, then loaded with the calibration checkpoint).
    The quantizer fuses, places observers / fake quant as ``hatcore.quant`` hints ask and
    returns a module with the same ``forward`` contract; ``hatcore.quant.set_mode`` switches
    it between observing and fake-quant. Stops at the first non-None result.

    :param model: the float model (eval mode, float weights loaded).
    :param spec: the structured ``[quantize]`` table.
    :param stage: ``"calibration"`` or ``"qat"``.
    :returns: the prepared model, or None when ``spec.type`` is not this plugin's.
    """


@hookspec(firstresult=True)
def export(
    model: nn.Module, spec: ExportSpec, path: Path, example_input: torch.Tensor
) -> dict[str, Any] | None:
    """Write the deployable fixed-point model (``.hbir``) of a quantized model.

    Called by the pipeline's ``export`` stage with the best QAT model (calibration model when
    QAT is disabled) in eval mode and fake-quant mode. Stops at the first non-None result.

    :param model: the quantized model, as returned by ``quantize`` and trained.
    :param spec: the structured ``[export]`` table.
    :param path: where to write the file (``work_dir/export/model.hbir``).
    :param example_input: an input of the deployed shape, ``Tensor[1, 3, H, W]``.
    :returns: a JSON-able description (ops, tensors, sizes) or None when not this plugin's.
    """


@hookspec(firstresult=True)
def compile(artifact: Path, spec: CompileSpec, out_dir: Path) -> dict[str, Any] | None:
    """Check and compile an exported model for the device.

    Called by the pipeline's ``compile`` stage with ``work_dir/export/model.hbir``. Writes
    ``model.hbm``, ``perf.json`` and ``perf.html`` into ``out_dir``. Stops at the first non-None
    result.

    :param artifact: the exported model file.
    :param spec: the structured ``[compile]`` table (``march`` ...).
    :param out_dir: ``work_dir/compile``.
    :returns: the performance estimate (``perf.json`` contents: ``march``, ``latency_ms``,
        ``fps``, ...) or None when not this plugin's.
    """


@hookspec(firstresult=True)
def check_model(
    model: nn.Module, spec: CompileSpec, example_input: torch.Tensor
) -> dict[str, Any] | None:
    """Check that a float model can be deployed, before any training.

    Called by ``hat run`` before the first stage (and by ``hat check``). Stops at the first
    non-None result.

    :param model: the float model.
    :param spec: the structured ``[compile]`` table (its ``march`` decides the limits).
    :param example_input: an input of the deployed shape.
    :returns: ``{"ok": bool, "text": str, ...}`` (a printable per-op report) or None.
    """


@hookspec(firstresult=True)
def load_deployed(path: Path, stage: str) -> Callable[[Batch], Any] | None:
    """Load a deployed artifact as a runner for prediction.

    Called by ``hat predict --stage int_infer`` (``path`` is ``export/model.hbir``) and
    ``--stage align_bpu`` (``compile/model.hbm``). The runner maps a batch to the same ``raw``
    outputs the float model's ``forward`` returns (dequantized to float), so the model's own
    ``postprocess`` decodes them. Stops at the first non-None result.

    :param path: the artifact.
    :param stage: ``"int_infer"`` or ``"align_bpu"``.
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


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add commands to the ``hat`` command line (``hat pack``, ``hat check`` ...).

    Called once when the CLI starts, for every plugin.

    :param cli: the root ``click.Group``; call ``cli.add_command(...)`` or use ``@cli.command()``.
    """


@hookspec
def on_epoch_end(trainer: Any, epoch: int, metrics: dict[str, float]) -> None:
    """Run after every training epoch (float and qat), validation included.

    Called by :class:`hatcore.trainer.Trainer` on every rank, for every plugin. Used for
    logging and bookkeeping; set ``trainer.should_stop = True`` to stop early.

    :param trainer: the running trainer (``trainer.stage``, ``trainer.model``, ``trainer.out_dir``).
    :param epoch: the epoch just finished, counting from 0.
    :param metrics: the epoch's averaged losses, learning rate and validation metrics.
    """
