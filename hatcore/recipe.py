"""Recipes: TOML in, typed attrs classes out, through one cattrs converter.

A recipe is data: reading one never runs code. Every table maps to an attrs class; tables chosen
by ``type = "..."`` (``[model]``, ``[data.train]``, each transform, ``[quantize]`` ...) are
structured by the class the providing plugin registered (``hat_components``). Unknown keys,
wrong types and unknown type names are all reported at once, each with its key path::

    $.stages.float.epoch: unknown key 'epoch'; did you mean 'epochs'?

Plugin authors declare their spec classes with :func:`spec` and :func:`option`, subclassing the
kind's base (``ModelSpec``, ``DatasetSpec``, ... or their own via :func:`polymorphic`).
"""

from __future__ import annotations

import difflib
import json
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import attrs
import cattrs
import tomllib
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn

from hatcore.errors import RecipeError
from hatcore.registry import Registry

T = TypeVar("T")

_NOTHING: Any = attrs.NOTHING


@typing.dataclass_transform(kw_only_default=True, field_specifiers=(attrs.field,))
def spec(cls: type[T]) -> type[T]:
    """Make ``cls`` a recipe table: an attrs class with keyword-only fields."""
    return attrs.define(kw_only=True)(cls)


def option(
    default: Any = _NOTHING, *, factory: Callable[[], Any] | None = None, doc: str = ""
) -> Any:
    """A recipe key with its documentation (shown in docs/recipe.md and error messages)."""
    if factory is not None:
        return attrs.field(factory=factory, metadata={"doc": doc})
    return attrs.field(default=default, metadata={"doc": doc})


# --------------------------------------------------------------------------- polymorphic tables

_POLY: dict[type, tuple[str, str | None]] = {}


def polymorphic(kind: str, default: str | None = None) -> Callable[[type[T]], type[T]]:
    """Declare ``cls`` the base of a kind: a field typed ``cls`` takes any registered type.

    :param kind: the registry kind (``"backbone"``); plugins register names under it.
    :param default: the type used when the table has no ``type`` key; None: the type an
        installed plugin registered with ``default=True`` for this kind (the core's kinds).
    """

    def deco(cls: type[T]) -> type[T]:
        _POLY[cls] = (kind, default)
        return cls

    return deco


@spec
class Spec:
    """Base of every table chosen by ``type``."""

    type: str = option(doc="the type name; `hat plugins` lists every installed one")


@polymorphic("model")
@spec
class ModelSpec(Spec):
    """``[model]``: the network (a plugin's ``build_model``)."""


@polymorphic("transform")
@spec
class TransformSpec(Spec):
    """One entry of a dataset's ``transforms`` list."""


@polymorphic("dataset")
@spec
class DatasetSpec(Spec):
    """``[data.train]`` / ``[data.val]``: a dataset and how it is batched."""

    batch_size: int = option(8, doc="images per batch (per process under torchrun)")
    num_workers: int = option(0, doc="DataLoader worker processes")
    shuffle: bool | None = option(None, doc="shuffle each epoch; default: true for train only")
    transforms: list[TransformSpec] = option(factory=list, doc="applied in order to each sample")


@polymorphic("metric")
@spec
class MetricSpec(Spec):
    """``[metric]``: how predictions are scored (default: the installed plugins' default metric)."""


@polymorphic("target")
@spec
class TargetSpec(Spec):
    """``[target]``: the device the model is deployed to, stated once (default: the installed
    plugins' default target); the quantizer, the exporter and the compiler all read it (their
    hooks' ``target`` argument)."""


@polymorphic("quantizer")
@spec
class QuantizeSpec(Spec):
    """``[quantize]``: the quantizer used by calibration and QAT (default: the installed
    plugins' default quantizer)."""


@polymorphic("exporter")
@spec
class ExportSpec(Spec):
    """``[export]``: the deployable fixed-point model (default: the installed plugins' default
    exporter)."""

    artifact: ClassVar[str] = "model.bin"
    """The file name the exporter writes in ``work_dir/export/`` (each exporter sets its own)."""

    input_shape: list[int] = option(
        factory=lambda: [1, 3, 512, 512], doc="deployed input N,C,H,W (check, export, perf)"
    )


@polymorphic("compiler")
@spec
class CompileSpec(Spec):
    """``[compile]``: the device compiler and performance model (default: the installed
    plugins' default compiler)."""

    artifact: ClassVar[str] = "model.bin"
    """The file name the compiler writes in ``work_dir/compile/`` (each compiler sets its own)."""


# --------------------------------------------------------------------------- core tables


@spec
class Task:
    """``[task]``: what the run is called, where it writes, how it is seeded."""

    name: str = option(doc="the run's name")
    work_dir: str = option(doc="where every artifact is written (relative to the current directory)")
    seed: int = option(0, doc="seed for every random generator")
    device: str = option("auto", doc="auto (CUDA when available), cpu, cuda, cuda:N")
    deterministic: bool = option(True, doc="deterministic kernels and seeded workers")
    requires: list[str] = option(
        factory=list, doc='plugin distributions the recipe needs, e.g. ["hat-coco", "hat-fcos>=0.1"] '
        "(as pytest's required_plugins): a missing one is named before anything runs")


@spec
class Optimizer:
    """``optimizer``: SGD or AdamW and the weight-decay rules per parameter group."""

    type: Literal["sgd", "adamw"] = option("sgd", doc="sgd or adamw")
    lr: float = option(0.01, doc="base learning rate (for the whole batch, all processes)")
    momentum: float = option(0.9, doc="SGD momentum")
    nesterov: bool = option(False, doc="SGD Nesterov momentum")
    betas: list[float] = option(factory=lambda: [0.9, 0.999], doc="AdamW betas")
    weight_decay: float = option(0.0, doc="weight decay of conv/linear weights")
    norm_weight_decay: float = option(0.0, doc="weight decay of normalisation layers")
    bias_weight_decay: float = option(0.0, doc="weight decay of biases")
    base_batch_size: int | None = option(
        None, doc="the global batch (all processes) `lr` was tuned for, e.g. 224 for the seed's "
        "8 GPUs x 28; the trainer scales `lr` to the actual global batch by `lr_scaling` and "
        "logs the result. Unset: `lr` is used as given, whatever the batch")
    lr_scaling: Literal["linear", "sqrt", "none"] = option(
        "linear", doc="with base_batch_size: lr x batch/base (linear, MMDetection's "
        "auto_scale_lr), lr x sqrt(batch/base) (sqrt), or lr as given (none)")


@spec
class Schedule:
    """``schedule``: learning rate over the stage, with linear warmup."""

    type: Literal["cosine", "step", "constant"] = option("cosine", doc="cosine, step or constant")
    warmup_epochs: float = option(0.0, doc="linear warmup length in epochs (may be fractional)")
    warmup_iters: int = option(0, doc="linear warmup length in iterations (wins when > 0)")
    min_warmup_iters: int = option(
        100, doc="a warmup that is asked for (warmup_epochs or warmup_iters > 0) lasts at least "
        "this many iterations (never beyond the stage), as Ultralytics' max(warmup_epochs x "
        "iters, 100): on a small set one epoch is a handful of iterations; 0: no floor")
    warmup_start_factor: float = option(0.1, doc="lr factor at the first warmup step")
    min_lr_ratio: float = option(0.0, doc="cosine: final lr as a fraction of the base lr")
    milestones: list[int] = option(factory=list, doc="step: epochs at which lr is multiplied by gamma")
    gamma: float = option(0.1, doc="step: decay factor")
    by: Literal["epoch", "iter"] = option("iter", doc="update the lr every iter or every epoch")


@spec
class TrainStage:
    """``[stages.float]`` / ``[stages.qat]``: one training stage."""

    enabled: bool = option(True, doc="run this stage")
    epochs: int = option(1, doc="epochs to train")
    optimizer: Optimizer = option(factory=Optimizer, doc="optimizer and parameter-group rules")
    schedule: Schedule = option(factory=Schedule, doc="learning-rate schedule")
    ema: bool = option(False, doc="keep an EMA of the weights (evaluated and saved as best)")
    ema_decay: float = option(0.9999, doc="EMA decay d; effective d*(1-exp(-step/ema_tau))")
    ema_tau: float = option(2000.0, doc="EMA warmup steps")
    grad_clip: float | None = option(None, doc="clip the gradient norm to this value")
    amp: bool = option(False, doc="mixed precision: bf16 on CPU, fp16 + GradScaler on CUDA")
    sync_bn: bool = option(False, doc="SyncBatchNorm when training on several processes")
    channels_last: bool = option(True, doc="channels-last memory format (faster on CPU)")
    frozen_bn: list[str] = option(
        factory=list, doc='module-name globs whose BatchNorm layers keep their pretrained statistics '
        '(eval mode) while training, e.g. ["backbone*"]; much faster on CPU')
    frozen: list[str] = option(
        factory=list, doc='module-name globs whose parameters do not train (no gradient, not in '
        'the optimizer), e.g. ["backbone.stem", "backbone.stages.[01]"]: a pretrained backbone\'s '
        'first layers, as mmdetection\'s frozen_stages; no backward pass runs through them, so a '
        'step is much cheaper. Their BatchNorm statistics still follow the data unless frozen_bn '
        'names them too')
    val_interval: int = option(1, doc="validate every N epochs and after the last; 0: never "
                               "(the best checkpoint is the last one, scored by `predict`)")
    log_interval: int = option(10, doc="iterations between log.jsonl lines")
    max_iters_per_epoch: int | None = option(None, doc="cap on iterations per epoch (smoke runs)")
    checkpoint_every_iters: int = option(
        0, doc="also write checkpoint-last.pt every N iterations inside an epoch (0: only at "
        "epoch ends), for long epochs; a resumed run continues from there exactly")
    load_from: str = option(
        "", doc="start from the weights of this checkpoint (another run's checkpoint-best.pt or "
        "-last.pt, or a bare state_dict), e.g. a COCO-trained model to fine-tune; keys whose "
        "shape differs (a new num_classes) are named and refused unless load_strict = false")
    load_strict: bool = option(
        True, doc="load_from: refuse a checkpoint with missing, unexpected or shape-mismatched "
        "keys; false: load the matching ones and report the rest by name")
    loss_rise_factor: float = option(
        2.0, doc="warn (log and terminal) when an epoch's mean loss exceeds this times the "
        "first epoch's: the likely cause is an lr too high for the batch; 0: off")


@spec
class CalibrationStage:
    """``[stages.calibration]``: post-training calibration."""

    enabled: bool = option(True, doc="run this stage")
    steps: int = option(32, doc="batches observed (no gradients), as HAT's `num_steps`")
    batch_size: int | None = option(
        None, doc="images per calibration batch; default: `data.train.batch_size`"
    )
    transforms: Literal["val", "train"] = option(
        "val", doc="whose transforms the training images get: `val` (HAT's default: no "
        "augmentation) or `train` (the augmented training batches)"
    )
    batches: int | None = option(None, doc="old name of `steps` (still read; prefer `steps`)")

    @property
    def num_steps(self) -> int:
        """``steps``, or the old ``batches`` where a recipe still sets it."""
        return self.steps if self.batches is None else self.batches


@spec
class Stages:
    """``[stages]``: the training stages, in order."""

    float: TrainStage = option(factory=TrainStage, doc="floating-point training")
    calibration: CalibrationStage = option(factory=CalibrationStage, doc="post-training calibration")
    qat: TrainStage = option(
        factory=lambda: TrainStage(enabled=True), doc="quantization-aware training"
    )


@spec
class Data:
    """``[data]``: the datasets."""

    train: DatasetSpec | None = option(None, doc="training set")
    val: DatasetSpec = option(doc="validation set (every predict and validation)")


@spec
class Predict:
    """``[predict]``: what ``hat run`` scores and draws at the end."""

    stages: list[str] = option(
        factory=list, doc="predict rows `hat run` scores (float, calibration, qat, int_infer, "
        "align_bpu and rows plugins add); default: every row of the stage table"
    )
    vis_images: int = option(4, doc="val images drawn with detections into work_dir/vis")
    vis_score_thr: float = option(0.3, doc="score threshold for drawn detections")


@spec
class Recipe:
    """The whole recipe file."""

    task: Task = option(doc="name, work dir, seed, device")
    model: ModelSpec = option(doc="the network")
    data: Data = option(doc="datasets")
    stages: Stages = option(factory=Stages, doc="training stages")
    metric: MetricSpec | None = option(None, doc="evaluation; default: the installed default metric")
    target: TargetSpec | None = option(None, doc="the deployment target (chip, input layout) that "
                                       "quantize, export and compile read; default: the "
                                       "installed default target")
    quantize: QuantizeSpec | None = option(None, doc="quantizer for calibration and qat; default: "
                                           "the installed default quantizer")
    export: ExportSpec | None = option(None, doc="fixed-point export; default: the installed "
                                       "default exporter")
    compile: CompileSpec | None = option(None, doc="device compiler and performance model; "
                                         "default: the installed default compiler")
    predict: Predict = option(factory=Predict, doc="which stages are evaluated")


# --------------------------------------------------------------------------- the converter


class UnknownTypeError(ValueError):
    pass


class StrictTypeError(TypeError):
    pass


def _strict(kind: type, name: str) -> Callable[[Any, type], Any]:
    def structure(value: Any, _: type) -> Any:
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not ok:
            raise StrictTypeError(f"expected {name}, got {value!r}")
        return value

    return structure


def make_converter(registry: Registry) -> cattrs.Converter:
    """The one converter: strict scalars, no extra keys, polymorphic tables via ``registry``."""
    conv = cattrs.Converter(forbid_extra_keys=True)
    conv.register_structure_hook(int, _strict(int, "an integer"))
    conv.register_structure_hook(float, _strict(float, "a number"))
    conv.register_structure_hook(str, _strict(str, "a string"))
    conv.register_structure_hook(bool, _strict(bool, "true or false"))

    concrete: dict[type, Callable[[Any, type], Any]] = {}

    def structure_poly(value: Any, base: type) -> Any:
        kind, default = _POLY[base]
        if not isinstance(value, dict):
            raise StrictTypeError(f"expected a table with a `type` key, got {value!r}")
        name = value.get("type", default)
        if name is None and registry.default(kind) is not None:
            name = registry.default(kind).name  # type: ignore[union-attr]
        if name is None:
            listed = ", ".join(registry.names(kind)) or "none installed"
            raise UnknownTypeError(f"missing `type`; valid {kind} types: {listed}")
        comp = registry.get(kind, name)
        if comp is None:
            raise UnknownTypeError(registry.unknown_message(kind, name))
        if not issubclass(comp.spec_cls, base):
            raise UnknownTypeError(
                f"plugin {comp.plugin!r} registered {comp.spec_cls.__name__} for {kind} type "
                f"{name!r}, which does not subclass {base.__name__} (a bug in that plugin)"
            )
        fn = concrete.get(comp.spec_cls)
        if fn is None:  # the attrs structuring itself, so a base class can be its own type
            fn = concrete[comp.spec_cls] = make_dict_structure_fn(
                comp.spec_cls, conv, _cattrs_forbid_extra_keys=True
            )
        return fn({**value, "type": name}, comp.spec_cls)

    conv.register_structure_hook_func(lambda t: t in _POLY, structure_poly)
    # unstructure a polymorphic field by its runtime class, not the declared base
    unconcrete: dict[type, Callable[[Any], Any]] = {}

    def unstructure_poly(obj: Any) -> Any:
        fn = unconcrete.get(type(obj))
        if fn is None:
            fn = unconcrete[type(obj)] = make_dict_unstructure_fn(type(obj), conv)
        return fn(obj)

    conv.register_unstructure_hook_func(lambda t: t in _POLY, unstructure_poly)
    return conv


def _field_names(cls: type) -> list[str]:
    return [f.name for f in attrs.fields(cls)] if attrs.has(cls) else []


def _describe(exc: BaseException, path: str, typ: Any) -> list[str]:
    if isinstance(exc, ForbiddenExtraKeysError):
        valid = _field_names(exc.cl)
        out = []
        moved = getattr(exc.cl, "moved_keys", {})
        for key in sorted(exc.extra_fields):
            if key in moved:  # a spec class's ``moved_keys``: where an old key lives now
                out.append(f"{path}.{key}: this key moved to {moved[key]}")
                continue
            msg = f"{path}.{key}: unknown key {key!r}"
            close = difflib.get_close_matches(key, valid, n=1)
            msg += f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"
            out.append(msg)
        return out
    if isinstance(exc, UnknownTypeError):
        return [f"{path}.type: {exc}"]
    if isinstance(exc, KeyError):
        return [f"{path}: required key missing"]
    if isinstance(exc, StrictTypeError):
        return [f"{path}: {exc}"]
    if typing.get_origin(typ) is Literal:
        choices = [str(c) for c in typing.get_args(typ)]
        bad = str(exc).split(" not in literal ")[0]  # cattrs: "{val} not in literal {type}"
        msg = f"{path}: must be one of {', '.join(repr(c) for c in choices)}, got {bad!r}"
        close = difflib.get_close_matches(bad, choices, n=1)
        return [msg + (f"; did you mean {close[0]!r}?" if close else "")]
    if isinstance(exc, AttributeError) and "items" in str(exc):
        return [f"{path}: expected a table"]
    tn = getattr(typ, "__name__", None) or (str(typ) if typ is not None else "")
    return [f"{path}: invalid value" + (f", expected {tn}" if tn else "") + f" ({exc})"]


def explain(exc: BaseException, path: str = "$") -> list[str]:
    """Every problem in a cattrs structuring error, one ``path: message`` line each."""
    if isinstance(exc, (ClassValidationError, IterableValidationError)):
        out: list[str] = []
        with_notes, without = exc.group_exceptions()
        for sub, note in with_notes:
            name = getattr(note, "name", None)
            p = f"{path}.{name}" if name is not None else f"{path}[{note.index!r}]"
            out.extend(explain(sub, p) if isinstance(
                sub, (ClassValidationError, IterableValidationError)) else _describe(sub, p, note.type))
        for sub in without:
            out.extend(explain(sub, path) if isinstance(
                sub, (ClassValidationError, IterableValidationError)) else _describe(sub, path, None))
        return out
    return _describe(exc, path, None)


# --------------------------------------------------------------------------- loading


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"stages.float.epochs=2"`` -> (["stages", "float", "epochs"], 2); values are TOML."""
    if "=" not in item:
        raise RecipeError("--set", [f"{item!r}: expected KEY=VALUE, e.g. stages.float.epochs=2"])
    key, raw = item.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word: take it as a string (`--set task.work_dir=runs/x`)
    return key.strip().split("."), value


def apply_override(data: dict[str, Any], keys: list[str], value: Any) -> None:
    node: Any = data
    for i, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                where = ".".join(keys[: i + 1])
                raise RecipeError("--set", [f"$.{where}: no list item {key!r}"])
            node = node[int(key)]
        else:
            node = node.setdefault(key, {})
            if not isinstance(node, (dict, list)):
                where = ".".join(keys[: i + 1])
                raise RecipeError("--set", [f"$.{where}: is a value, not a table"])
    last = keys[-1]
    if isinstance(node, list) and last.isdigit() and int(last) < len(node):
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise RecipeError("--set", [f"$.{'.'.join(keys)}: cannot set"])


def load_recipe(
    path: str | Path, registry: Registry, overrides: list[str] | tuple[str, ...] = ()
) -> tuple[Recipe, dict[str, Any]]:
    """Read, override and validate a recipe.

    :returns: the structured recipe and the raw (overridden) table it came from. Relative
        ``task.work_dir`` is resolved against the current directory.
    :raises RecipeError: listing every problem, each with its key path.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise RecipeError(str(path), [f"cannot read the recipe: {exc.strerror}"]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(str(path), [f"not valid TOML: {exc}"]) from None
    for item in overrides:
        apply_override(data, *parse_override(item))
    check_requires(path, data, registry.distributions)
    for section, kind in SECTION_KINDS.items():
        # structured eagerly: an absent section is its kind's default type, when one is installed
        if section not in data and registry.default(kind) is not None:
            data[section] = {}
    conv = make_converter(registry)
    try:
        recipe = conv.structure(data, Recipe)
    except (ClassValidationError, IterableValidationError) as exc:
        raise RecipeError(str(path), explain(exc)) from None
    return recipe, data


SECTION_KINDS = {"metric": "metric", "target": "target", "quantize": "quantizer",
                 "export": "exporter", "compile": "compiler"}
"""The recipe's plugin-chosen sections and the registry kind each one's ``type`` names."""

OPTIONAL_SECTIONS = ("target",)
"""Sections a stage may read without needing them: its hooks get None when no plugin provides
one (a quantizer without a device target)."""


def check_requires(path: Path, data: dict[str, Any], loaded: set[str] | None = None) -> None:
    """Each distribution of ``task.requires`` is installed (its version fits) and, when
    ``loaded`` (the loaded plugins' distributions) is given, loaded; else say which."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import InvalidRequirement, Requirement

    task = data.get("task")
    requires = task.get("requires", []) if isinstance(task, dict) else []
    if not isinstance(requires, list):
        return  # the converter reports the wrong type with the other problems
    problems = []
    for i, item in enumerate(requires):
        if not isinstance(item, str):
            continue
        try:
            req = Requirement(item)
        except InvalidRequirement as exc:
            problems.append(f"$.task.requires[{i}]: {item!r} is not a requirement ({exc})")
            continue
        try:
            have = version(req.name)
        except PackageNotFoundError:
            problems.append(f"$.task.requires[{i}]: the recipe needs the {req.name} plugin, which "
                            f"is not installed (pip install {item!r})")
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            problems.append(f"$.task.requires[{i}]: the recipe needs {item}, installed is "
                            f"{req.name} {have} (pip install {item!r})")
        elif loaded is not None and _canon(req.name) not in {_canon(d) for d in loaded}:
            problems.append(f"$.task.requires[{i}]: {req.name} is installed but not loaded "
                            "(left out by HAT_LOAD_PLUGINS, or it failed to load: `hat plugins`)")
    if problems:
        raise RecipeError(str(path), problems)


def _canon(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def resolved(recipe: Recipe, registry: Registry) -> dict[str, Any]:
    """The recipe with every default filled in, as JSON-able data."""
    out: dict[str, Any] = make_converter(registry).unstructure(recipe)
    return out


def fingerprint(data: Any) -> str:
    """A stable short hash of JSON-able data (stage inputs, for skip-if-done)."""
    import hashlib

    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
