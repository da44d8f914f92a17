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

from typing import Any, TypedDict

import torch


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
