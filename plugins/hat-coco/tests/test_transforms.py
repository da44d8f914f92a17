"""Transforms keep boxes consistent with the pixels (hypothesis), the BPU's YUV formula, seeding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hat_coco import specs as S
from hat_coco import transforms as T
from hat_coco.plugin import build_transform
from hypothesis import given, settings
from hypothesis import strategies as st

from hatcore.errors import UserError


def _sample(h: int, w: int, box: tuple[int, int, int, int]) -> dict:
    img = np.zeros((h, w, 3), np.uint8)
    x1, y1, x2, y2 = box
    img[y1:y2, x1:x2] = 255
    return {"img": img, "gt_boxes": np.array([box], np.float32), "gt_labels": np.array([1]),
            "meta": {"orig_size": (h, w), "img_shape": (h, w), "pad_shape": (h, w),
                     "scale": (1.0, 1.0), "flip": False}}


@st.composite
def boxed_images(draw: st.DrawFn) -> dict:
    h, w = draw(st.integers(16, 96)), draw(st.integers(16, 96))
    x1, y1 = draw(st.integers(0, w - 6)), draw(st.integers(0, h - 6))
    x2, y2 = draw(st.integers(x1 + 6, w)), draw(st.integers(y1 + 6, h))
    return _sample(h, w, (x1, y1, x2, y2))


RESIZE = st.sampled_from([
    S.ResizeSpec(type="resize", img_scale=[64, 48], ratio_range=[0.5, 2.0], keep_ratio=True),
    S.ResizeSpec(type="resize", img_scale=[40, 80], keep_ratio=False),
])
# interpolation blurs an edge by about a pixel per resize, so a chain resizes once, first
GEOMETRIC = st.sampled_from([
    S.RandomCropSpec(type="random_crop", size=[32, 40]),
    S.PadSpec(type="pad", divisor=32),
    S.RandomFlipSpec(type="random_flip", px=0.5, py=0.5),
])


@settings(max_examples=200, deadline=None)
@given(sample=boxed_images(), first=st.lists(RESIZE, max_size=1),
       then=st.lists(GEOMETRIC, max_size=3), seed=st.integers(0, 2**31))
def test_hook_build_transform_geometric_chains_keep_boxes_on_their_pixels(
        sample: dict, first: list[S.TransformSpec], then: list[S.TransformSpec],
        seed: int) -> None:
    torch.manual_seed(seed)
    out = sample
    for spec in first + then:
        out = build_transform(spec=spec)(out)
    img = out["img"][..., 0]
    h, w = out["meta"]["img_shape"]
    assert img.shape[:2] == tuple(out["meta"]["pad_shape"])
    assert len(out["gt_boxes"]) == len(out["gt_labels"]) <= 1
    if not len(out["gt_boxes"]):  # dropped: only when the crop left less than a pixel of it
        assert img[:h, :w].astype(int).sum() < 255 * max(h, w)
        return
    x1, y1, x2, y2 = out["gt_boxes"][0]
    assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
    ys, xs = np.mgrid[:img.shape[0], :img.shape[1]] + 0.5  # pixel centres
    inside = (xs > x1 + 1) & (xs < x2 - 1) & (ys > y1 + 1) & (ys < y2 - 1)
    outside = (xs < x1 - 1) | (xs > x2 + 1) | (ys < y1 - 1) | (ys > y2 + 1)
    assert (img[inside] > 127).all(), "a pixel inside the box lost the drawing"
    assert (img[outside] < 128).all(), "the drawing leaked outside the box"


@settings(max_examples=30, deadline=None)
@given(sample=boxed_images(), seed=st.integers(0, 2**31))
def test_colour_transforms_leave_boxes_and_shape_alone(sample: dict, seed: int) -> None:
    torch.manual_seed(seed)
    boxes = sample["gt_boxes"].copy()
    shape = sample["img"].shape
    out = T.ToTensor(to_yuv=True)(T.AugmentHSV(0.1, 0.7, 0.4)(sample))
    assert out["img"].shape == (3, *shape[:2])
    assert torch.equal(out["gt_boxes"], torch.from_numpy(boxes))


def test_to_tensor_yuv_is_bt601_full_range_rounded() -> None:
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [0, 0, 0],
                     [10, 200, 30]]], np.uint8)
    out = T.ToTensor(to_yuv=True)({"img": rgb, "gt_boxes": np.zeros((0, 4)),
                                   "gt_labels": np.zeros(0)})["img"]
    r, g, b = (rgb[..., i].astype(float) for i in range(3))
    y = 0.299 * r + 0.587 * g + 0.114 * b
    u = -0.168736 * r - 0.331264 * g + 0.5 * b + 128
    v = 0.5 * r - 0.418688 * g - 0.081312 * b + 128
    want = np.clip(np.floor(np.stack([y, u, v]) + 0.5), 0, 255)
    assert np.array_equal(out.numpy(), want)
    assert out[:, 0, 0].tolist() == [76, 85, 255]  # pure red
    norm = T.Normalize([128] * 3, [128] * 3)({"img": out})["img"]
    assert torch.allclose(norm, (out - 128) / 128)


def test_transforms_repeat_under_the_same_torch_seed_and_differ_otherwise() -> None:
    resize = T.Resize([64, 64], [0.5, 2.0])

    def shapes(seed: int) -> list:
        torch.manual_seed(seed)
        return [resize(_sample(50, 50, (5, 5, 20, 20)))["meta"]["img_shape"] for _ in range(5)]

    assert shapes(1) == shapes(1)
    assert shapes(1) != shapes(2)


def test_order_mistakes_are_user_errors() -> None:
    s = T.ToTensor()(_sample(20, 20, (1, 1, 9, 9)))
    with pytest.raises(UserError, match="before `to_tensor`"):
        T.Resize([10, 10])(s)
    with pytest.raises(UserError, match="after `to_tensor`"):
        T.Normalize([0] * 3, [1] * 3)(_sample(20, 20, (1, 1, 9, 9)))


def test_fast_yuv_equals_the_float64_formula_on_every_colour() -> None:
    """The float32 path with its tie fix-up must agree with hat-bpu's float64 formula exactly."""
    grid = np.arange(256, dtype=np.uint8)
    for r0 in range(0, 256, 32):  # 32 reds at a time: 2M colours, bounded memory
        rgb = np.stack(np.meshgrid(grid[r0:r0 + 32], grid, grid, indexing="ij"), -1)
        rgb = rgb.reshape(2048, 1024, 3)
        r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
        y = 0.299 * r + 0.587 * g + 0.114 * b
        u = -0.168736 * r - 0.331264 * g + 0.5 * b + 128
        v = 0.5 * r - 0.418688 * g - 0.081312 * b + 128
        want = np.clip(np.floor(np.stack([y, u, v], -1) + 0.5), 0, 255).astype(np.uint8)
        assert np.array_equal(T.rgb_to_yuv444(rgb), want), f"reds {r0}..{r0 + 31}"


@pytest.mark.parametrize(("make", "message"), [
    (lambda: T.Resize([512]), "img_scale must be \\[h, w\\]"),
    (lambda: T.Resize([512, 512], [2.0, 0.5]), "ratio_range must be \\[lo, hi\\]"),
    (lambda: T.RandomCrop([0, 10]), "size must be \\[h, w\\]"),
    (lambda: T.Pad(0), "divisor must be >= 1"),
    (lambda: T.Normalize([128, 128], [128, 128]), "mean and std need 3 values"),
])
def test_bad_transform_settings_name_the_key(make, message: str) -> None:
    with pytest.raises(UserError, match=message):
        make()
