"""The data contract between dataset plugins, model plugins and the core.

A dataset item is a dict; a collated batch (``dataset.collate_fn``) is a :class:`Batch`.
Box coordinates are ``(x1, y1, x2, y2)`` pixels of the *network input* (after resize/pad);
``meta`` says how to map them back to the original image.

The task-model contract (what ``build_model`` returns)::

    raw = model(batch["img"])                     # the deployable graph, Tensor[B,3,H,W] -> raw
    losses = model.compute_loss(raw, batch)       # dict[str, Tensor]; the trainer sums them
    dets = model.postprocess(raw, batch)          # list[Detections], original-image coordinates

``raw`` is whatever the model's quantized part returns (a tuple of tensors); deployed runners
(``load_deployed``) return the same structure, so one ``postprocess`` serves every stage.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypedDict

import torch
from torch.utils.data import Dataset, default_collate


class ImageMeta(TypedDict, total=False):
    image_id: int              # the dataset's own id (COCO image id)
    file_name: str
    orig_size: tuple[int, int]  # (h, w) of the original image
    img_shape: tuple[int, int]  # (h, w) after resize, before padding
    pad_shape: tuple[int, int]  # (h, w) of the network input
    scale: tuple[float, float]  # (sy, sx): input pixel = original pixel * scale
    flip: bool


class Batch(TypedDict, total=False):
    img: torch.Tensor              # Tensor[B, 3, H, W] float, normalised (YUV: (p-128)/128)
    gt_boxes: list[torch.Tensor]   # per image Tensor[N_i, 4] xyxy, input pixels
    gt_labels: list[torch.Tensor]  # per image Tensor[N_i] int64, contiguous 0..C-1
    meta: list[ImageMeta]


class Detections(TypedDict):
    boxes: torch.Tensor   # Tensor[N, 4] xyxy in original-image pixels
    scores: torch.Tensor  # Tensor[N]
    labels: torch.Tensor  # Tensor[N] int64, contiguous 0..C-1 (dataset.class_names index)


def to_device(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Move every tensor (and tensors in lists) of a batch to ``device``."""
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device, non_blocking=True)
        elif isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
            out[k] = [t.to(device, non_blocking=True) for t in v]
        else:
            out[k] = v
    return out


LOAD_SECONDS = "_load_seconds"
"""The key :class:`TimedDataset` adds to each collated batch (a dict): the seconds the process
that made it (a loader worker, or the main process without workers) spent reading and
transforming its items and collating them. The trainer pops it before the model sees the batch."""

_batch_started = [0.0]  # per process (each loader worker has its own copy of this module)


class TimedDataset(Dataset[Any]):
    """``dataset`` with each batch's making timed, for the trainer's loader figures.

    The loader's worker reads a batch through :meth:`__getitems__` (torch's batched fetch) and
    collates it with :meth:`collate_fn`, one after the other in the same process: the first
    notes the time, the second adds ``LOAD_SECONDS`` to the batch. Every other attribute
    (``transforms``, ``class_names``...) is the wrapped dataset's.
    """

    def __init__(self, dataset: Dataset[Any], collate: Callable[[list[Any]], Any] | None) -> None:
        self.dataset = dataset
        self._collate = collate if collate is not None else default_collate

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def __getitems__(self, indices: list[int]) -> list[Any]:
        _batch_started[0] = time.perf_counter()
        batched = getattr(self.dataset, "__getitems__", None)
        return list(batched(indices)) if batched else [self.dataset[i] for i in indices]

    def collate_fn(self, items: list[Any]) -> Any:
        batch = self._collate(items)
        if isinstance(batch, dict) and _batch_started[0]:
            batch[LOAD_SECONDS] = time.perf_counter() - _batch_started[0]
        _batch_started[0] = 0.0
        return batch

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("dataset", "_collate"):  # (unpickling: not set yet)
            raise AttributeError(name)
        return getattr(self.dataset, name)
