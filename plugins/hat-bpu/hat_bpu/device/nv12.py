"""The board's input path: pixels ↔ RGB ↔ NV12 ↔ YUV444, in integers (BT.601 full range, JFIF).

On the device the camera / decoder delivers NV12 (a full-resolution Y plane and a half-resolution
interleaved UV plane: 4:2:0); the BPU's input stage expands it back to YUV444 and feeds
``p - 128`` as int8. The formulas (8-bit, rounded half away from zero, clamped to 0..255)::

    Y =  0.299 R + 0.587 G + 0.114 B
    U = -0.168736 R - 0.331264 G + 0.5 B + 128
    V =  0.5 R - 0.418688 G - 0.081312 B + 128
    R = Y + 1.402 (V - 128)
    G = Y - 0.344136 (U - 128) - 0.714136 (V - 128)
    B = Y + 1.772 (U - 128)

NV12 chroma of a 2×2 block = ``(a + b + c + d + 2) >> 2`` of the full-resolution U (V); the
YUV444 expansion repeats each chroma sample over its 2×2 block (nearest). H and W must be even.
hat-coco's ``to_tensor`` with ``board_input = "nv12"`` computes the same round trip in its own
code (numpy), so training sees these pixels; ``tests/test_deploy_board.py`` checks the two agree
bit for bit.
"""

from __future__ import annotations

import torch

from hatcore.errors import UserError


def _round8(x: torch.Tensor) -> torch.Tensor:
    return torch.floor(x + 0.5).clamp_(0, 255)


def yuv_to_rgb(yuv: torch.Tensor) -> torch.Tensor:
    """Tensor[N, 3, H, W] YUV pixels 0..255 → RGB pixels 0..255 (float64 holding integers)."""
    y, u, v = (c.double() for c in yuv.unbind(1))
    r = y + 1.402 * (v - 128)
    g = y - 0.344136 * (u - 128) - 0.714136 * (v - 128)
    b = y + 1.772 * (u - 128)
    return _round8(torch.stack([r, g, b], 1))


def rgb_to_yuv(rgb: torch.Tensor) -> torch.Tensor:
    """Tensor[N, 3, H, W] RGB pixels 0..255 → YUV pixels 0..255 (float64 holding integers)."""
    r, g, b = (c.double() for c in rgb.unbind(1))
    y = 0.299 * r + 0.587 * g + 0.114 * b
    u = -0.168736 * r - 0.331264 * g + 0.5 * b + 128
    v = 0.5 * r - 0.418688 * g - 0.081312 * b + 128
    return _round8(torch.stack([y, u, v], 1))


def yuv_to_nv12(yuv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """YUV444 pixels Tensor[N, 3, H, W] (integers 0..255) → (Y uint8 Tensor[N, H, W], UV uint8
    Tensor[N, H/2, W/2, 2]): the luma plane as is, each 2×2 block's chroma averaged."""
    n, _, h, w = yuv.shape
    if h % 2 or w % 2:
        raise UserError(f"NV12 needs an even input height and width, got {h}x{w}")
    yuv = yuv.long()
    uv = yuv[:, 1:].reshape(n, 2, h // 2, 2, w // 2, 2).sum((3, 5))
    uv = torch.bitwise_right_shift(uv + 2, 2)
    return yuv[:, 0].to(torch.uint8), uv.permute(0, 2, 3, 1).to(torch.uint8).contiguous()


def rgb_to_nv12(rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB pixels Tensor[N, 3, H, W] → (Y uint8 Tensor[N, H, W], UV uint8 Tensor[N, H/2, W/2, 2])."""
    return yuv_to_nv12(rgb_to_yuv(rgb))


def nv12_to_yuv444(y: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """(Y Tensor[N, H, W], UV Tensor[N, H/2, W/2, 2]) → YUV444 pixels Tensor[N, 3, H, W] (int64)."""
    c = uv.long().permute(0, 3, 1, 2)
    c = c.repeat_interleave(2, 2).repeat_interleave(2, 3)
    return torch.cat([y.long()[:, None], c], 1)


def board_input(img: torch.Tensor) -> torch.Tensor:
    """The batch's normalised YUV444 tensor → what the board feeds the BPU, normalised again.

    ``img = (p - 128) / 128`` → YUV pixels ``p`` → NV12 (the frame as the camera / decoder
    delivers it) → YUV444 → ``(p' - 128) / 128`` (exactly the int8 ``p' - 128`` at scale 1/128).
    The batch's YUV444 is the dataset's RGB through the BT.601 formula above (hat-coco's
    ``to_tensor``, bit-exact), so this is the NV12 of that RGB image with no second colour
    conversion; on an image already through ``to_tensor``'s ``board_input = "nv12"`` it changes
    nothing. Tensor[N, 3, H, W] → Tensor[N, 3, H, W].
    """
    pix = torch.round(img.detach().cpu().double() * 128 + 128).clamp_(0, 255)
    y, uv = yuv_to_nv12(pix)
    return (nv12_to_yuv444(y, uv).float() - 128) / 128
