"""A tiny, fast task model and dataset that follow the hatcore contracts.

Each image holds one bright square on a dark background; the model predicts one box and one
class per image. Enough to exercise the trainer, pipeline and CLI in seconds.

It also adds a stage to the stage table (``hat_stages``): ``toy_round`` rounds the float
weights to multiples of 1/8 and is scored by its own predict (and summary) row, proving that a
plugin adds a stage without touching the core. Its hook implementations do not check the spec's
class: the core calls a ``build_*`` hook only on the plugin that registered the spec's type.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from hatcore import hookimpl
from hatcore.quant import DeQuantStub, QuantStub
from hatcore.recipe import DatasetSpec, MetricSpec, ModelSpec, TransformSpec, option, spec
from hatcore.registry import Register
from hatcore.stages import Stage


@spec
class ToyModelSpec(ModelSpec):
    num_classes: int = option(2, doc="number of classes")
    width: int = option(8, doc="channels of the conv layers")


@spec
class ToyDataSpec(DatasetSpec):
    size: int = option(32, doc="image side in pixels")
    length: int = option(16, doc="number of images")
    num_classes: int = option(2, doc="number of classes")


@spec
class ToyFlipSpec(TransformSpec):
    p: float = option(0.5, doc="probability of a horizontal flip")


@spec
class ToyMetricSpec(MetricSpec):
    iou: float = option(0.5, doc="IoU that counts as a hit")


class ToyDetector(nn.Module):
    def __init__(self, num_classes: int = 2, width: int = 8) -> None:
        super().__init__()
        self.quant = QuantStub(scale=1 / 128)
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, 2, 1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, 2, 1), nn.BatchNorm2d(width), nn.ReLU(),
        )
        self.box = nn.Conv2d(width, 4, 1)
        self.cls = nn.Conv2d(width, num_classes, 1)
        self.dequant = DeQuantStub()

    def forward(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.body(self.quant(img))
        return self.dequant(self.box(x)), self.dequant(self.cls(x))

    def compute_loss(self, raw: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        box, cls = (r.mean((2, 3)) for r in raw)
        h, w = batch["img"].shape[-2:]
        scale = torch.tensor([w, h, w, h], dtype=box.dtype, device=box.device)
        target = torch.stack([b[0] for b in batch["gt_boxes"]]) / scale
        labels = torch.stack([lb[0] for lb in batch["gt_labels"]])
        return {"loss_box": F.l1_loss(box.sigmoid(), target), "loss_cls": F.cross_entropy(cls, labels)}

    def postprocess(self, raw: Any, batch: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        box, cls = (r.mean((2, 3)) for r in raw)
        h, w = batch["img"].shape[-2:]
        boxes = box.sigmoid() * torch.tensor([w, h, w, h], dtype=box.dtype, device=box.device)
        prob = cls.softmax(1)
        scores, labels = prob.max(1)
        return [{"boxes": boxes[i : i + 1], "scores": scores[i : i + 1], "labels": labels[i : i + 1]}
                for i in range(len(boxes))]


class ToyDataset(torch.utils.data.Dataset):
    def __init__(self, size: int, length: int, num_classes: int, seed: int, transforms: list) -> None:
        self.size, self.length, self.num_classes, self.seed = size, length, num_classes, seed
        self.transforms = transforms
        self.class_names = [f"class{i}" for i in range(num_classes)]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(self.seed * 100003 + i)
        s = self.size
        side = int(torch.randint(s // 4, s // 2, (1,), generator=g))
        x0, y0 = (int(v) for v in torch.randint(0, s - side, (2,), generator=g))
        label = i % self.num_classes
        img = torch.full((3, s, s), -0.5)
        img[label % 3, y0 : y0 + side, x0 : x0 + side] = 0.9
        sample = {
            "img": img,
            "gt_boxes": torch.tensor([[x0, y0, x0 + side, y0 + side]], dtype=torch.float32),
            "gt_labels": torch.tensor([label]),
            "meta": {"image_id": i, "orig_size": (s, s), "img_shape": (s, s), "scale": (1.0, 1.0)},
        }
        for t in self.transforms:
            sample = t(sample)
        return sample

    @staticmethod
    def collate_fn(items: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "img": torch.stack([it["img"] for it in items]),
            "gt_boxes": [it["gt_boxes"] for it in items],
            "gt_labels": [it["gt_labels"] for it in items],
            "meta": [it["meta"] for it in items],
        }


class ToyFlip:
    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        if torch.rand(()) < self.p:
            w = sample["img"].shape[-1]
            sample["img"] = sample["img"].flip(-1)
            b = sample["gt_boxes"].clone()
            b[:, [0, 2]] = w - sample["gt_boxes"][:, [2, 0]]
            sample["gt_boxes"] = b
        return sample


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    area = lambda x: (x[:, 2:] - x[:, :2]).clamp(min=0).prod(1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


class ToyMetric:
    """Fraction of images whose one detection has the right class and IoU >= ``iou``."""

    def __init__(self, dataset: ToyDataset, iou: float) -> None:
        self.dataset, self.iou = dataset, iou
        self.reset()

    def reset(self) -> None:
        self.hits, self.total = 0, 0

    def update(self, detections: list[dict[str, torch.Tensor]], batch: dict[str, Any]) -> None:
        for det, gt, lab in zip(detections, batch["gt_boxes"], batch["gt_labels"], strict=True):
            iou = box_iou(det["boxes"][:1].float(), gt[:1].to(det["boxes"].device))
            ok = bool(det["labels"][0] == lab[0]) and float(iou[0]) >= self.iou
            self.hits += int(ok)
            self.total += 1

    def compute(self, out_dir: Path | None = None) -> dict[str, dict[str, float]]:
        import json

        ap = self.hits / max(self.total, 1)
        result = {"bbox": {"AP": ap, "AP50": ap}}
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "metrics.json").write_text(json.dumps(result))
            (out_dir / "detections.json").write_text("[]")
        return result


@hookimpl
def hat_components(register: Register) -> None:
    register("model", "toy_detector", ToyModelSpec, "one-box-per-image toy detector")
    register("dataset", "toy_squares", ToyDataSpec, "one coloured square per image")
    register("transform", "toy_flip", ToyFlipSpec, "horizontal flip")
    register("metric", "toy_hits", ToyMetricSpec, "fraction of correct single detections")


@hookimpl
def build_model(spec: ToyModelSpec) -> nn.Module:
    return ToyDetector(spec.num_classes, spec.width)


@hookimpl
def build_dataset(spec: ToyDataSpec, split: str, transforms: list) -> Any:
    return ToyDataset(spec.size, spec.length, spec.num_classes, 0 if split == "train" else 1,
                      transforms)


@hookimpl
def build_transform(spec: ToyFlipSpec) -> Any:
    return ToyFlip(spec.p)


@hookimpl
def build_metric(spec: ToyMetricSpec, dataset: Any) -> Any:
    return ToyMetric(dataset, spec.iou)


# --------------------------------------------------------------------------- a plugin stage

ROUND_STEP = 1 / 8


def run_round(pipe: Any, stage: Stage) -> dict[str, Any]:
    """Round every float weight to a multiple of ``ROUND_STEP``; save as this stage's best."""
    from hatcore.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(pipe.stage_checkpoint(stage.needs[0]))["model"]
    rounded = {k: (v / ROUND_STEP).round() * ROUND_STEP if v.is_floating_point() else v
               for k, v in state.items()}
    save_checkpoint(pipe.workdir.checkpoint(stage.name), {"model": rounded, "stage": stage.name})
    pipe.echo(f"{stage.name}: rounded {len(rounded)} tensors to multiples of {ROUND_STEP}")
    return {"tensors": len(rounded)}


def load_round(pipe: Any, stage: Stage, ckpt: Path | None) -> tuple[nn.Module, Any]:
    from hatcore.checkpoint import load_checkpoint

    model = pipe.build_model()
    model.load_state_dict(load_checkpoint(ckpt or pipe.stage_checkpoint(stage.name))["model"])
    model.to(pipe.device).eval()
    return model, lambda batch: model(batch["img"])


@hookimpl
def hat_stages() -> list[Stage]:
    return [Stage("toy_round", run_round, needs=("float",), after="float",
                  artifacts=lambda recipe: ("checkpoint-best.pt",), predict="toy_round",
                  load=load_round, enabled=_round_enabled)]


def _round_enabled(recipe: Any) -> bool:
    """Only for the toy model (the plugin is installed in the dev environment of every run)."""
    return bool(recipe.stages.float.enabled and recipe.model.type == "toy_detector")
