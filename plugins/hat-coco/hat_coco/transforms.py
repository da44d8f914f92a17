"""Sample transforms. Each keeps ``gt_boxes`` consistent with the pixels.

A sample before ``ToTensor`` (docs/coco.md)::

    img       np.ndarray[H, W, 3] uint8, RGB
    gt_boxes  np.ndarray[N, 4] float32, xyxy in the current image's pixels
    gt_labels np.ndarray[N] int64, contiguous 0..C-1
    meta      dict: image_id, file_name, orig_size, img_shape, pad_shape, scale (sy, sx), flip,
              source ({"path": ...} or {"lmdb": ..., "key": ...})

``ToTensor`` turns ``img`` into ``Tensor[3, H, W]`` float (0..255, YUV or RGB; through the board's
NV12 input conversion with ``board_input = "nv12"``) and the boxes and labels into tensors;
``Normalize`` then gives ``(p - mean) / std``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch

from hatcore.errors import UserError

Sample = dict[str, Any]

class _TorchRandom:
    """numpy-style draws from torch's global generator.

    DataLoader workers seed torch with ``base_seed + worker_id`` (the base drawn from the
    loader's generator), so workers differ, epochs differ, and a seeded run repeats;
    ``torch.manual_seed`` alone makes a single-process run repeat.
    """

    @staticmethod
    def random() -> float:
        return float(torch.rand(()))

    @staticmethod
    def uniform(lo: float, hi: float, n: int | None = None) -> Any:
        u = torch.rand(() if n is None else (n,), dtype=torch.float64).numpy()
        return float(lo + (hi - lo) * u) if n is None else lo + (hi - lo) * u

    @staticmethod
    def integers(lo: int, hi: int) -> int:
        """An integer in [lo, hi)."""
        return int(torch.randint(lo, hi, ()))


def rng() -> _TorchRandom:
    """The random source of every transform (torch's global generator)."""
    return _TorchRandom()


def _image(sample: Sample, name: str) -> np.ndarray:
    img = sample["img"]
    if not isinstance(img, np.ndarray):
        raise UserError(f"transform {name!r} needs the HWC uint8 image; put it before `to_tensor`")
    return img


def _set_shape(sample: Sample, img: np.ndarray) -> None:
    sample["img"] = img
    sample["meta"]["img_shape"] = (img.shape[0], img.shape[1])
    sample["meta"]["pad_shape"] = (img.shape[0], img.shape[1])


class Resize:
    """Resize to ``img_scale`` [h, w] times a random factor from ``ratio_range``."""

    def __init__(self, img_scale: Sequence[int], ratio_range: Sequence[float] | None = None,
                 keep_ratio: bool = True) -> None:
        if len(img_scale) != 2 or min(img_scale) < 1:
            raise UserError(f"resize: img_scale must be [h, w] (positive), got {list(img_scale)}")
        if ratio_range and (len(ratio_range) != 2 or not 0 < ratio_range[0] <= ratio_range[1]):
            raise UserError(f"resize: ratio_range must be [lo, hi] with 0 < lo <= hi, got "
                            f"{list(ratio_range)}")
        self.img_scale = (int(img_scale[0]), int(img_scale[1]))
        self.ratio_range = tuple(ratio_range) if ratio_range else None
        self.keep_ratio = keep_ratio

    def __call__(self, sample: Sample) -> Sample:
        img = _image(sample, "resize")
        h0, w0 = img.shape[:2]
        th, tw = float(self.img_scale[0]), float(self.img_scale[1])
        if self.ratio_range:
            lo, hi = self.ratio_range
            r = float(rng().uniform(lo, hi))
            th, tw = th * r, tw * r
        if self.keep_ratio:
            s = min(th / h0, tw / w0)
            sy = sx = s
        else:
            sy, sx = th / h0, tw / w0
        h, w = max(1, round(h0 * sy)), max(1, round(w0 * sx))
        sy, sx = h / h0, w / w0  # the exact factors the pixels got
        if (h, w) != (h0, w0):
            img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
        _set_shape(sample, img)
        boxes = sample["gt_boxes"] * np.array([sx, sy, sx, sy], np.float32)
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)  # float32 rounding must not leave the image
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
        sample["gt_boxes"] = boxes
        oy, ox = sample["meta"]["scale"]
        sample["meta"]["scale"] = (oy * sy, ox * sx)
        return sample


def _keep_boxes(sample: Sample, keep: np.ndarray) -> None:
    sample["gt_boxes"] = sample["gt_boxes"][keep]
    sample["gt_labels"] = sample["gt_labels"][keep]


class RandomCrop:
    """A random ``size`` [h, w] window; boxes clipped to it, boxes left empty dropped."""

    def __init__(self, size: Sequence[int]) -> None:
        if len(size) != 2 or min(size) < 1:
            raise UserError(f"random_crop: size must be [h, w] (positive), got {list(size)}")
        self.size = (int(size[0]), int(size[1]))

    def __call__(self, sample: Sample) -> Sample:
        img = _image(sample, "random_crop")
        h, w = img.shape[:2]
        ch, cw = min(self.size[0], h), min(self.size[1], w)
        y0 = int(rng().integers(0, h - ch + 1))
        x0 = int(rng().integers(0, w - cw + 1))
        _set_shape(sample, np.ascontiguousarray(img[y0:y0 + ch, x0:x0 + cw]))
        boxes = sample["gt_boxes"] - np.array([x0, y0, x0, y0], np.float32)
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, cw)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, ch)
        sample["gt_boxes"] = boxes
        _keep_boxes(sample, (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1))
        oy, ox = sample["meta"].get("crop", (0, 0))
        sy, sx = sample["meta"]["scale"]
        sample["meta"]["crop"] = (oy + y0 / sy, ox + x0 / sx)  # offset in original pixels
        return sample


class Pad:
    """Pad bottom/right with zeros to a multiple of ``divisor``."""

    def __init__(self, divisor: int) -> None:
        if divisor < 1:
            raise UserError(f"pad: divisor must be >= 1, got {divisor}")
        self.divisor = divisor

    def __call__(self, sample: Sample) -> Sample:
        img = _image(sample, "pad")
        h, w = img.shape[:2]
        d = self.divisor
        ph, pw = -(-h // d) * d, -(-w // d) * d
        if (ph, pw) != (h, w):
            img = cv2.copyMakeBorder(img, 0, ph - h, 0, pw - w, cv2.BORDER_CONSTANT, value=0)
        sample["img"] = img
        sample["meta"]["pad_shape"] = (ph, pw)
        return sample


class RandomFlip:
    """Flip horizontally with probability ``px`` and vertically with ``py``."""

    def __init__(self, px: float = 0.5, py: float = 0.0) -> None:
        self.px, self.py = px, py

    def __call__(self, sample: Sample) -> Sample:
        img = _image(sample, "random_flip")
        h, w = sample["meta"]["img_shape"]  # flip the image, not the padding after it
        if self.px > 0 and rng().random() < self.px:
            img = img.copy()
            img[:h, :w] = img[:h, :w][:, ::-1]
            b = sample["gt_boxes"].copy()
            b[:, 0], b[:, 2] = w - sample["gt_boxes"][:, 2], w - sample["gt_boxes"][:, 0]
            sample["gt_boxes"] = b
            sample["meta"]["flip"] = not sample["meta"].get("flip", False)
        if self.py > 0 and rng().random() < self.py:
            img = img.copy()
            img[:h, :w] = img[:h, :w][::-1]
            b = sample["gt_boxes"].copy()
            b[:, 1], b[:, 3] = h - sample["gt_boxes"][:, 3], h - sample["gt_boxes"][:, 1]
            sample["gt_boxes"] = b
            sample["meta"]["flip_v"] = not sample["meta"].get("flip_v", False)
        sample["img"] = img
        return sample


class AugmentHSV:
    """Random hue/saturation/value gains (YOLOv5 style, via lookup tables)."""

    def __init__(self, hgain: float = 0.015, sgain: float = 0.7, vgain: float = 0.4) -> None:
        self.gains = np.array([hgain, sgain, vgain])

    def __call__(self, sample: Sample) -> Sample:
        img = _image(sample, "augment_hsv")
        r = rng().uniform(-1, 1, 3) * self.gains + 1
        hue, sat, val = cv2.split(cv2.cvtColor(img, cv2.COLOR_RGB2HSV))
        x = np.arange(256, dtype=np.float32)
        lut_h = ((x * r[0]) % 180).astype(np.uint8)
        lut_s = np.clip(x * r[1], 0, 255).astype(np.uint8)
        lut_v = np.clip(x * r[2], 0, 255).astype(np.uint8)
        hsv = cv2.merge((cv2.LUT(hue, lut_h), cv2.LUT(sat, lut_s), cv2.LUT(val, lut_v)))
        sample["img"] = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        return sample


# BT.601 full range (JFIF), the BPU's input formula (hat-bpu nv12.py): each channel computed in
# float64 in this order, rounded half up, clamped to 0..255.
#   Y = 0.299 R + 0.587 G + 0.114 B
#   U = -0.168736 R - 0.331264 G + 0.5 B + 128
#   V = 0.5 R - 0.418688 G - 0.081312 B + 128
_RGB2YUV = np.array([[0.299, 0.587, 0.114],
                     [-0.168736, -0.331264, 0.5],
                     [0.5, -0.418688, -0.081312]])
_TABLES = _RGB2YUV[:, :, None] * np.arange(256, dtype=np.float64)  # [3, 3, 256] products
_M32 = np.hstack([_RGB2YUV, [[0.5], [128.5], [128.5]]]).astype(np.float32)  # + rounding 0.5
_TIE = 1e-3  # float32 error is < 1e-4 here; closer than this to .5 is redone in float64


def _yuv_exact(rgb: np.ndarray) -> np.ndarray:
    """``uint8[N, 3]`` RGB -> YUV as hat-bpu computes it (float64, same operation order)."""
    r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    t = _TABLES
    y = t[0, 0][r] + t[0, 1][g] + t[0, 2][b]
    u = t[1, 0][r] + t[1, 1][g] + t[1, 2][b] + 128
    v = t[2, 0][r] + t[2, 1][g] + t[2, 2][b] + 128
    return np.clip(np.floor(np.stack([y, u, v], 1) + 0.5), 0, 255).astype(np.uint8)


def rgb_to_yuv444(img: np.ndarray) -> np.ndarray:
    """RGB ``np.ndarray[H, W, 3]`` uint8 -> YUV444 uint8, bit-exact with the BPU's formula.

    float32 through OpenCV for speed; the few pixels whose value lies within ``_TIE`` of a
    rounding boundary are recomputed in float64 (tested over all 2**24 colours).
    """
    val = cv2.transform(img.astype(np.float32), _M32)  # [H, W, 3], all >= 0.5
    low = np.floor(val)
    dist = np.abs(np.subtract(val, low + 0.5, out=val), out=val)  # to the nearest tie
    out = np.minimum(low, 255, out=low).astype(np.uint8)
    tie = dist > 0.5 - _TIE
    near = tie[..., 0] | tie[..., 1] | tie[..., 2]
    if near.any():
        out[near] = _yuv_exact(img[near])
    return out


def nv12_round_trip(yuv: np.ndarray) -> np.ndarray:
    """YUV444 ``np.ndarray[H, W, 3]`` uint8 -> the same image through NV12 (4:2:0) and back.

    What the board's input stage does (hat-bpu ``device/nv12.py``, ``board_input``): Y kept; the
    chroma of each 2x2 block is ``(a + b + c + d + 2) >> 2`` of its four U (V) samples, and the
    expansion back to YUV444 repeats it over the block. H and W must be even (NV12 has no
    half block); idempotent: a 4:2:0 image passes unchanged.
    """
    h, w = yuv.shape[:2]
    if h % 2 or w % 2:
        raise UserError(f"to_tensor: board_input = 'nv12' needs an even image height and width "
                        f"(NV12 has no half chroma block), got {h}x{w}; put `pad` with an even "
                        "divisor before `to_tensor`")
    c = yuv[..., 1:].astype(np.uint16).reshape(h // 2, 2, w // 2, 2, 2)
    block = (c[:, 0, :, 0] + c[:, 0, :, 1] + c[:, 1, :, 0] + c[:, 1, :, 1] + 2) >> 2
    out = yuv.copy()
    out[..., 1:] = block.astype(np.uint8).repeat(2, 0).repeat(2, 1)
    return out


BOARD_INPUTS = ("none", "nv12")


class ToTensor:
    """HWC uint8 -> ``Tensor[3, H, W]`` float32 (0..255; YUV444 when ``to_yuv``), boxes to tensors.

    :param board_input: ``"nv12"``: the YUV image goes through the board's NV12 (4:2:0) input
        conversion (:func:`nv12_round_trip`), so training and validation see what the deployed
        model sees; ``"none"``: full-resolution YUV444.
    """

    def __init__(self, to_yuv: bool = True, board_input: str = "none") -> None:
        if board_input not in BOARD_INPUTS:
            raise UserError(f"to_tensor: board_input must be one of {BOARD_INPUTS}, got "
                            f"{board_input!r}")
        if board_input != "none" and not to_yuv:
            raise UserError(f"to_tensor: board_input = {board_input!r} converts YUV; set "
                            "to_yuv = true")
        self.to_yuv = to_yuv
        self.board_input = board_input

    def __call__(self, sample: Sample) -> Sample:
        img = _image(sample, "to_tensor")
        if self.to_yuv:
            img = rgb_to_yuv444(img)
        if self.board_input == "nv12":
            img = nv12_round_trip(img)
        sample["img"] = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float()
        sample["gt_boxes"] = torch.as_tensor(sample["gt_boxes"], dtype=torch.float32).reshape(-1, 4)
        sample["gt_labels"] = torch.as_tensor(sample["gt_labels"], dtype=torch.int64).reshape(-1)
        return sample


class Normalize:
    """``(img - mean) / std`` per channel on the tensor image (after ``to_tensor``)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise UserError(f"normalize: mean and std need 3 values, std > 0; got {mean}, {std}")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, sample: Sample) -> Sample:
        img = sample["img"]
        if not isinstance(img, torch.Tensor):
            raise UserError("transform 'normalize' needs a tensor image; put it after `to_tensor`")
        sample["img"] = (img - self.mean) / self.std
        return sample


def collate(items: list[Sample]) -> dict[str, Any]:
    """Samples -> ``hatcore.data.Batch``; images zero-padded bottom/right to the batch's max size.

    :returns: ``img`` Tensor[B, 3, H, W], ``gt_boxes`` list of Tensor[N_i, 4],
        ``gt_labels`` list of Tensor[N_i] int64, ``meta`` list of dicts (``pad_shape`` = H, W).
    """
    imgs = [it["img"] for it in items]
    if not all(isinstance(im, torch.Tensor) for im in imgs):
        raise UserError("collate needs tensor images: add `to_tensor` to the dataset's transforms")
    h = max(im.shape[-2] for im in imgs)
    w = max(im.shape[-1] for im in imgs)
    shape = (len(imgs), imgs[0].shape[0], h, w)
    if torch.utils.data.get_worker_info() is not None:  # straight into shared memory, one copy
        storage = imgs[0].untyped_storage()._new_shared(  # type: ignore[attr-defined]
            int(np.prod(shape)) * imgs[0].element_size())
        out = imgs[0].new(storage).view(shape).zero_()
    else:
        out = imgs[0].new_zeros(shape)
    metas = []
    for i, (im, it) in enumerate(zip(imgs, items, strict=True)):
        out[i, :, : im.shape[-2], : im.shape[-1]] = im
        metas.append({**it["meta"], "pad_shape": (h, w)})
    return {"img": out, "gt_boxes": [it["gt_boxes"] for it in items],
            "gt_labels": [it["gt_labels"] for it in items], "meta": metas}


class Mosaic:
    """Mosaic (YOLOv4/YOLOX) with optional MixUp, on the raw sample: a dataset-level transform.

    Put it first in ``data.train.transforms``: it takes the sample and three others drawn from
    the same dataset (``bind(dataset)``, called when the dataset is built), each resized to fit
    a ``size`` [h, w] quadrant (keeping its aspect ratio), and lays them around a random centre
    on a 2h x 2w grey canvas; boxes are shifted and clipped with their pixels, boxes left
    smaller than ``min_box`` px on a side dropped. With probability ``mixup_prob`` the canvas is
    then averaged (0.5 / 0.5) with another sample resized onto it, boxes of both kept. Applied
    with probability ``prob``, and not in the last ``off_last_epochs`` epochs of a stage (the
    trainer calls ``set_epoch(epoch, epochs)``), so training ends on undistorted images.
    The canvas replaces the image: follow it with ``resize`` (to ``size``) as usual.
    """

    def __init__(self, size: Sequence[int], prob: float = 1.0, mixup_prob: float = 0.0,
                 off_last_epochs: int = 0, min_box: float = 2.0) -> None:
        if len(size) != 2 or min(size) < 1:
            raise UserError(f"mosaic: size must be [h, w] (positive), got {list(size)}")
        if not (0 <= prob <= 1 and 0 <= mixup_prob <= 1) or off_last_epochs < 0:
            raise UserError(f"mosaic: prob and mixup_prob must be in [0, 1] and off_last_epochs "
                            f">= 0; got {prob}, {mixup_prob}, {off_last_epochs}")
        self.size = (int(size[0]), int(size[1]))
        self.prob, self.mixup_prob, self.off_last = prob, mixup_prob, off_last_epochs
        self.min_box = min_box
        self.dataset: Any = None
        self.active = True

    def bind(self, dataset: Any) -> None:
        """The dataset the other images come from (its ``raw_sample(i)`` and ``len``)."""
        self.dataset = dataset

    def set_epoch(self, epoch: int, epochs: int) -> None:
        self.active = epoch < epochs - self.off_last

    def _other(self) -> Sample:
        return self.dataset.raw_sample(rng().integers(0, len(self.dataset)))

    def __call__(self, sample: Sample) -> Sample:
        if self.dataset is None or not self.active or rng().random() >= self.prob:
            return sample
        h, w = self.size
        cy, cx = int(rng().uniform(0.5 * h, 1.5 * h)), int(rng().uniform(0.5 * w, 1.5 * w))
        canvas, boxes, labels = mosaic_canvas(
            [sample] + [self._other() for _ in range(3)], (h, w), (cy, cx))
        if self.mixup_prob > 0 and rng().random() < self.mixup_prob:
            other = self._other()
            img, b = _fit(other["img"], other["gt_boxes"], (2 * h, 2 * w))
            canvas[: img.shape[0], : img.shape[1]] = (
                canvas[: img.shape[0], : img.shape[1]].astype(np.float32) * 0.5 + img * 0.5
            ).astype(np.uint8)
            boxes = np.concatenate([boxes, b])
            labels = np.concatenate([labels, other["gt_labels"]])
        keep = (boxes[:, 2] - boxes[:, 0] >= self.min_box) & \
            (boxes[:, 3] - boxes[:, 1] >= self.min_box)
        sample["img"] = canvas
        sample["gt_boxes"] = boxes[keep].astype(np.float32).reshape(-1, 4)
        sample["gt_labels"] = labels[keep].astype(np.int64)
        meta = sample["meta"]
        meta.update(img_shape=canvas.shape[:2], pad_shape=canvas.shape[:2], mosaic=True)
        return sample


def _fit(img: np.ndarray, boxes: np.ndarray, hw: tuple[int, int]
         ) -> tuple[np.ndarray, np.ndarray]:
    """Resize ``img`` to fit inside ``hw`` keeping its aspect ratio; boxes scaled alike."""
    s = min(hw[0] / img.shape[0], hw[1] / img.shape[1])
    nh, nw = max(1, round(img.shape[0] * s)), max(1, round(img.shape[1] * s))
    sy, sx = nh / img.shape[0], nw / img.shape[1]
    out = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
    return out, boxes.reshape(-1, 4) * np.array([sx, sy, sx, sy], np.float32)


def mosaic_canvas(samples: list[Sample], size: tuple[int, int], centre: tuple[int, int]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Four samples around ``centre`` (y, x) on a 2h x 2w canvas filled with 114.

    Sample 0 goes top-left of the centre, 1 top-right, 2 bottom-left, 3 bottom-right, each
    resized to fit an h x w quadrant and cut where it leaves the canvas; its boxes move with it
    and are clipped to the part shown. :returns: canvas uint8[2h, 2w, 3], boxes float32[N, 4],
    labels int64[N].
    """
    h, w = size
    cy, cx = centre
    canvas = np.full((2 * h, 2 * w, 3), 114, np.uint8)
    all_boxes, all_labels = [], []
    for k, s in enumerate(samples):
        img, b = _fit(s["img"], s["gt_boxes"], (h, w))
        ih, iw = img.shape[:2]
        x0 = cx - iw if k in (0, 2) else cx  # where the image's top-left corner lands
        y0 = cy - ih if k in (0, 1) else cy
        cx1, cy1 = max(x0, 0), max(y0, 0)  # the part of the canvas it covers
        cx2, cy2 = min(x0 + iw, 2 * w), min(y0 + ih, 2 * h)
        if cx2 <= cx1 or cy2 <= cy1:
            continue
        canvas[cy1:cy2, cx1:cx2] = img[cy1 - y0:cy2 - y0, cx1 - x0:cx2 - x0]
        b = b + np.array([x0, y0, x0, y0], np.float32)
        b[:, 0::2] = b[:, 0::2].clip(cx1, cx2)
        b[:, 1::2] = b[:, 1::2].clip(cy1, cy2)
        all_boxes.append(b)
        all_labels.append(np.asarray(s["gt_labels"], np.int64).reshape(-1))
    boxes = np.concatenate(all_boxes) if all_boxes else np.zeros((0, 4), np.float32)
    labels = np.concatenate(all_labels) if all_labels else np.zeros(0, np.int64)
    return canvas, boxes.astype(np.float32), labels
