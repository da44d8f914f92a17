"""A pytest plugin for testing HAT plugins, shipped with hatcore (entry point ``pytest11``).

Installed with hatcore, so a plugin's own tests get these fixtures without importing anything:

* ``hat_plugins(*plugins, load=(), tiny=True)`` - a fresh plugin manager for this test (set as
  the process-wide one until the test ends): the core, the installed distributions or entry
  points named in ``load``, the plugin objects or modules given, and - unless ``tiny=False`` -
  the harness's own tiny task (below).
* ``hat_workdir`` - an empty work dir (``tmp_path/"work"``); the test runs in ``tmp_path``.
* ``tiny_dataset`` - a built :class:`TinySquares` dataset (8 images of 32 px, one square each).
* ``tiny_recipe(**sections)`` - writes a recipe that trains the tiny task for one short float
  epoch into ``hat_workdir`` and returns its path. Each keyword replaces or merges one top-level
  table: a table with another ``type`` replaces the default, one without is merged key by key
  (``None`` removes a key), e.g. ``tiny_recipe(model={"type": "my_net"})``.
* ``run_tiny(recipe, stages=None, deploy=False)`` - runs the recipe through the stage table
  (``hat run``'s road) and returns a :class:`TinyRun`. ``deploy=True`` also enables calibration,
  so export and compile run too, with whatever quantizer, exporter and compiler the plugins
  provide; the test is skipped, saying which kind is missing, when none is installed.
* ``hat_cli(*args)`` - runs ``hat ARGS`` in-process under the current plugin manager and
  returns click's ``Result`` (``exit_code``, ``output``).

The tiny task is a test-only plugin that lives here, never registered through an entry point:
model ``tiny_detector`` (one box and class per image; quantizable: it marks its integer domain
with ``hatcore.quant`` stubs), dataset ``tiny_squares`` (one coloured square per image, generated
from a seed) and metric ``tiny_hits`` (the fraction of images whose best detection has the right
class at IoU >= 0.5). A dataset, transform, metric, backend or command plugin is tested against
it; a model plugin brings its own model and uses ``tiny_squares``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from hatcore import hookimpl
from hatcore.recipe import DatasetSpec, MetricSpec, ModelSpec, option, spec

if TYPE_CHECKING:
    from click.testing import Result
    from torch import nn

    from hatcore.pipeline import Pipeline
    from hatcore.plugins import Plugins
    from hatcore.registry import Register

TINY_PLUGIN = "hat-testing"
"""The name the tiny task is registered under in a harness plugin manager."""


# --------------------------------------------------------------------------- the tiny task


@spec
class TinyDetectorSpec(ModelSpec):
    num_classes: int = option(2, doc="number of classes")
    width: int = option(8, doc="channels of the conv layers")


@spec
class TinySquaresSpec(DatasetSpec):
    size: int = option(32, doc="image side in pixels")
    length: int = option(8, doc="number of images")
    num_classes: int = option(2, doc="number of classes (the square's colour channel)")


@spec
class TinyHitsSpec(MetricSpec):
    iou: float = option(0.5, doc="IoU that counts as a hit")


def _detector(num_classes: int, width: int) -> nn.Module:
    import torch
    from torch import nn
    from torch.nn import functional as F

    from hatcore.quant import DeQuantStub, QuantStub

    class TinyDetector(nn.Module):
        """``forward(img) -> (box Tensor[B,4,h,w], cls Tensor[B,C,h,w])``; the image-mean of each
        map is the image's one box (sigmoid, as a fraction of the image) and class logits."""

        def __init__(self) -> None:
            super().__init__()
            self.quant = QuantStub(scale=1 / 128)
            self.body = nn.Sequential(
                nn.Conv2d(3, width, 3, 2, 1), nn.BatchNorm2d(width), nn.ReLU(),
                nn.Conv2d(width, width, 3, 2, 1), nn.BatchNorm2d(width), nn.ReLU())
            self.box = nn.Conv2d(width, 4, 1)
            self.cls = nn.Conv2d(width, num_classes, 1)
            self.dequant = DeQuantStub()

        def forward(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = self.body(self.quant(img))
            return self.dequant(self.box(x)), self.dequant(self.cls(x))

        def _decode(self, raw: Any, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
            box, cls = (r.mean((2, 3)) for r in raw)
            h, w = batch["img"].shape[-2:]
            return box.sigmoid() * box.new_tensor([w, h, w, h]), cls

        def compute_loss(self, raw: Any, batch: Any) -> dict[str, torch.Tensor]:
            boxes, cls = self._decode(raw, batch)
            h, w = batch["img"].shape[-2:]
            target = torch.stack([b[0] for b in batch["gt_boxes"]]).to(boxes)  # first box
            labels = torch.stack([lb[0] for lb in batch["gt_labels"]]).to(cls.device)
            return {"loss_box": F.l1_loss(boxes / max(h, w), target / max(h, w)),
                    "loss_cls": F.cross_entropy(cls, labels)}

        def postprocess(self, raw: Any, batch: Any) -> list[dict[str, torch.Tensor]]:
            boxes, cls = self._decode(raw, batch)
            scores, labels = cls.softmax(1).max(1)
            out = []
            for i, meta in enumerate(batch.get("meta") or [{}] * len(boxes)):
                sy, sx = meta.get("scale", (1.0, 1.0))
                b = boxes[i : i + 1] / boxes.new_tensor([sx, sy, sx, sy])
                out.append({"boxes": b, "scores": scores[i : i + 1], "labels": labels[i : i + 1]})
            return out

    return TinyDetector()


class TinySquares:
    """``length`` images of ``size`` px, each one square whose colour channel is its class.

    Items follow :mod:`hatcore.data`: ``img`` Tensor[3, H, W] in -1..1, ``gt_boxes``
    Tensor[1, 4] xyxy pixels, ``gt_labels`` Tensor[1], ``meta``. Deterministic in ``seed``.
    """

    def __init__(self, size: int = 32, length: int = 8, num_classes: int = 2, seed: int = 0,
                 transforms: list[Callable[[dict[str, Any]], dict[str, Any]]] | None = None
                 ) -> None:
        self.size, self.length, self.num_classes, self.seed = size, length, num_classes, seed
        self.transforms = list(transforms or [])
        self.class_names = [f"class{i}" for i in range(num_classes)]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        if not 0 <= i < self.length:
            raise IndexError(i)
        g = torch.Generator().manual_seed(self.seed * 100003 + i)
        s = self.size
        side = int(torch.randint(s // 4, s // 2 + 1, (1,), generator=g))
        x0, y0 = (int(v) for v in torch.randint(0, s - side + 1, (2,), generator=g))
        label = i % self.num_classes
        img = torch.full((3, s, s), -0.5)
        img[label % 3, y0 : y0 + side, x0 : x0 + side] = 0.9
        sample: dict[str, Any] = {
            "img": img,
            "gt_boxes": torch.tensor([[x0, y0, x0 + side, y0 + side]], dtype=torch.float32),
            "gt_labels": torch.tensor([label]),
            "meta": {"image_id": i, "orig_size": (s, s), "img_shape": (s, s),
                     "pad_shape": (s, s), "scale": (1.0, 1.0)},
        }
        for t in self.transforms:
            sample = t(sample)
        return sample

    @staticmethod
    def collate_fn(items: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        return {"img": torch.stack([it["img"] for it in items]),
                "gt_boxes": [it["gt_boxes"] for it in items],
                "gt_labels": [it["gt_labels"] for it in items],
                "meta": [it["meta"] for it in items]}


def box_iou(a: Any, b: Any) -> Any:
    """IoU of each box of ``a`` (Tensor[N, 4] xyxy) with the box of ``b`` at the same index."""
    import torch

    lt, rb = torch.maximum(a[:, :2], b[:, :2]), torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(1)
    return inter / (area_a + area_b - inter).clamp(min=1e-9)


class TinyHits:
    """AP stand-in: the fraction of images whose highest-scoring detection has the class of the
    image's first box at IoU >= ``iou`` (coordinates of the original image)."""

    def __init__(self, iou: float = 0.5) -> None:
        self.iou = iou
        self.reset()

    def reset(self) -> None:
        self.hits, self.total = 0, 0

    def update(self, detections: list[dict[str, Any]], batch: Any) -> None:
        for det, gt, lab, meta in zip(detections, batch["gt_boxes"], batch["gt_labels"],
                                      batch.get("meta") or [{}] * len(detections), strict=True):
            self.total += 1
            if not len(det["scores"]) or not len(gt):
                continue
            best = int(det["scores"].argmax())
            sy, sx = meta.get("scale", (1.0, 1.0))
            truth = gt[:1].float().cpu() / gt.new_tensor([sx, sy, sx, sy]).cpu()
            iou = float(box_iou(det["boxes"][best : best + 1].float().cpu(), truth)[0])
            self.hits += int(int(det["labels"][best]) == int(lab[0]) and iou >= self.iou)

    def compute(self, out_dir: Path | None = None) -> dict[str, dict[str, float]]:
        ap = self.hits / max(self.total, 1)
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "detections.json").write_text("[]")
        return {"bbox": {"AP": ap, "AP50": ap}}


class TinyTask:
    """The harness's own plugin: ``tiny_detector``, ``tiny_squares`` and ``tiny_hits``."""

    @hookimpl
    def hat_components(self, register: Register) -> None:
        register("model", "tiny_detector", TinyDetectorSpec, "hatcore.testing: one box per image")
        register("dataset", "tiny_squares", TinySquaresSpec, "hatcore.testing: one square per image")
        register("metric", "tiny_hits", TinyHitsSpec, "hatcore.testing: correct best detections")

    @hookimpl
    def build_model(self, spec: TinyDetectorSpec) -> Any:
        return _detector(spec.num_classes, spec.width)

    @hookimpl
    def build_dataset(self, spec: TinySquaresSpec, split: str, transforms: list[Any]) -> Any:
        return TinySquares(spec.size, spec.length, spec.num_classes, 0 if split == "train" else 1,
                           transforms)

    @hookimpl
    def build_metric(self, spec: TinyHitsSpec, dataset: Any) -> Any:
        return TinyHits(spec.iou)


# --------------------------------------------------------------------------- recipes


def tiny_sections(work_dir: Path | str) -> dict[str, Any]:
    """The tiny recipe's tables: one float epoch of two iterations on 8 images (each logged), no
    deploy."""
    return {
        "task": {"name": "tiny", "work_dir": str(work_dir), "device": "cpu", "seed": 0},
        "model": {"type": "tiny_detector"},
        "data": {"train": {"type": "tiny_squares", "length": 8, "batch_size": 4},
                 "val": {"type": "tiny_squares", "length": 4, "batch_size": 4}},
        "metric": {"type": "tiny_hits"},
        "stages": {"float": {"epochs": 1, "val_interval": 0, "channels_last": False, "log_interval": 1,
                             "optimizer": {"lr": 0.05}},
                   "calibration": {"enabled": False, "batches": 1},
                   "qat": {"enabled": False, "epochs": 1, "val_interval": 0,
                           "optimizer": {"lr": 0.005}}},
        "predict": {"vis_images": 0},
    }


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on ``base``: a table naming another ``type`` replaces, others merge; None removes."""
    out = dict(base)
    for key, value in over.items():
        old = out.get(key)
        if value is None:
            out.pop(key, None)
        elif (isinstance(value, dict) and isinstance(old, dict)
              and value.get("type", old.get("type")) == old.get("type")):
            out[key] = merge(old, value)
        else:
            out[key] = value
    return out


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str | Path):
        return json.dumps(str(v))
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_value(x)}" for k, x in v.items() if x is not None) + " }"
    raise TypeError(f"cannot write {v!r} ({type(v).__name__}) as TOML")


def to_toml(tables: dict[str, Any], prefix: str = "") -> str:
    """Write nested dicts as TOML: dicts become ``[tables]``, dicts inside lists inline tables."""
    lines = [f"{k} = {_value(v)}" for k, v in tables.items()
             if v is not None and not isinstance(v, dict)]
    for k, v in tables.items():
        if isinstance(v, dict):
            lines += ["", f"[{prefix}{k}]", to_toml(v, f"{prefix}{k}.")]
    return "\n".join(lines).strip() + "\n"


def write_recipe(path: Path, work_dir: Path, **sections: Any) -> Path:
    """Write the tiny recipe with ``sections`` applied (see :func:`merge`) to ``path``."""
    path.write_text(to_toml(merge(tiny_sections(work_dir), sections)))
    return path


# --------------------------------------------------------------------------- running


@dataclass
class TinyRun:
    """What :func:`run_tiny` ran: the run (``pipe``) and readers of what it wrote."""

    pipe: Pipeline

    @property
    def work_dir(self) -> Path:
        return self.pipe.work_dir

    def metrics(self, row: str) -> dict[str, Any]:
        """``predict/<row>/metrics.json`` (a stage's score)."""
        return dict(json.loads(self.pipe.workdir.predict_metrics(row).read_text()))

    def stage_state(self, stage: str) -> dict[str, Any]:
        """``<stage>/stage.json``: done, fingerprint and what the stage's runner returned."""
        return dict(json.loads((self.pipe.workdir.stage(stage) / "stage.json").read_text()))


DEPLOY_KINDS = {"quantize": "quantizer", "export": "exporter", "compile": "compiler"}


def run_tiny(recipe: Path, stages: list[str] | None = None, *, deploy: bool = False,
             overrides: tuple[str, ...] = (), plugins: Plugins | None = None) -> TinyRun:
    """Run ``recipe`` through its stage table (all stages, or ``stages``) and its predict rows.

    :param deploy: enable calibration too, so the deploy stages of the table run on whatever
        quantizer, exporter and compiler are installed; skips the test when a kind is missing.
    :param plugins: the manager to run under (default: the process-wide one, which the
        ``hat_plugins`` fixture sets).
    """
    from hatcore.pipeline import Pipeline
    from hatcore.plugins import get_plugins

    plugins = plugins or get_plugins()
    if deploy:
        overrides = (*overrides, "stages.calibration.enabled=true")
    pipe = Pipeline.load(recipe, overrides, plugins=plugins)
    if deploy:
        for section, kind in DEPLOY_KINDS.items():
            if getattr(pipe.recipe, section) is None:
                pytest.skip(f"no loaded plugin provides a {kind}, needed for calibration → export "
                            f"({plugins.registry.kind_hint(kind)})")
    pipe.run(stages)
    return TinyRun(pipe)


# --------------------------------------------------------------------------- fixtures


def _named(plugin: Any) -> tuple[str, object]:
    if isinstance(plugin, tuple):
        return plugin[0], plugin[1]
    return getattr(plugin, "__name__", None) or type(plugin).__name__, plugin


@pytest.fixture
def hat_plugins() -> Iterator[Callable[..., Plugins]]:
    """Factory: ``hat_plugins(*plugins, load=("hat-mine",), tiny=True) -> Plugins``."""
    from hatcore.plugins import make_plugin_manager, set_plugins

    def make(*plugins: Any, load: tuple[str, ...] | list[str] = (), tiny: bool = True) -> Plugins:
        extra = [_named(p) for p in plugins]
        if tiny:
            extra.insert(0, (TINY_PLUGIN, TinyTask()))
        made = make_plugin_manager(only=set(load), extra=extra)
        found = {n for i in made.info.values() for n in (i.name, i.distribution)}
        for name in load:
            if name in made.failed:
                pytest.fail(f"plugin {name!r} failed to load: {made.failed[name]}")
            if name not in found:
                pytest.fail(f"no installed plugin is named {name!r} (entry point or distribution "
                            "in the `hat` group): `pip install -e .` the plugin first")
        set_plugins(made)
        return made

    try:
        yield make
    finally:
        set_plugins(None)


@pytest.fixture
def hat_workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``tmp_path/"work"`` (not created); the test's current directory is ``tmp_path``."""
    monkeypatch.chdir(tmp_path)
    return tmp_path / "work"


@pytest.fixture
def tiny_dataset() -> TinySquares:
    """The tiny task's training set: 8 images of 32 px, one square each."""
    return TinySquares()


@pytest.fixture
def tiny_recipe(hat_workdir: Path) -> Callable[..., Path]:
    """Factory: ``tiny_recipe(**sections) -> Path`` of a recipe writing into ``hat_workdir``."""
    counter = iter(range(1_000_000))

    def make(**sections: Any) -> Path:
        path = hat_workdir.parent / f"tiny{next(counter) or ''}.toml"
        return write_recipe(path, hat_workdir, **sections)

    return make


@pytest.fixture(name="run_tiny")
def run_tiny_fixture() -> Callable[..., TinyRun]:
    """:func:`run_tiny`: ``run_tiny(recipe, stages=None, deploy=False) -> TinyRun``."""
    return run_tiny


@pytest.fixture
def hat_cli() -> Callable[..., Result]:
    """``hat_cli(*args) -> click.testing.Result``: ``hat ARGS`` under the current plugins."""
    from click.testing import CliRunner

    from hatcore.cli import cli

    def invoke(*args: str) -> Result:
        return CliRunner().invoke(cli, [str(a) for a in args])

    return invoke
