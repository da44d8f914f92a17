"""EXIF orientation: decoded images come out as displayed, for every orientation value."""

from __future__ import annotations

import io

import numpy as np
import pytest
import simplejpeg
from hat_coco.decode import decode_rgb, exif_orientation


def displayed_by_definition(stored: np.ndarray, orientation: int) -> np.ndarray:
    """The EXIF definition, pixel by pixel: where the stored row 0 and column 0 are shown.

    1 top/left, 2 top/right, 3 bottom/right, 4 bottom/left (rows stay rows); 5 left/top,
    6 right/top, 7 right/bottom, 8 left/bottom (stored rows become displayed columns).
    """
    h, w = stored.shape[:2]
    swap = orientation >= 5
    out = np.zeros((w, h, 3) if swap else (h, w, 3), stored.dtype)
    for r in range(h):
        for c in range(w):
            if not swap:
                row = r if orientation in (1, 2) else h - 1 - r
                col = c if orientation in (1, 4) else w - 1 - c
            else:
                col = r if orientation in (5, 8) else h - 1 - r  # row 0 shown on the left/right
                row = c if orientation in (5, 6) else w - 1 - c  # column 0 on the top/bottom
            out[row, col] = stored[r, c]
    return out


def _stored_image(h: int = 12, w: int = 20) -> np.ndarray:
    rng = np.random.default_rng(0)
    img = np.kron(rng.integers(0, 255, (h // 4, w // 4, 3)), np.ones((4, 4, 1))).astype(np.uint8)
    return img


@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpeg_is_decoded_in_the_displayed_orientation(orientation: int, exif_jpeg) -> None:
    data = exif_jpeg(_stored_image(), orientation, big_endian=orientation == 6)
    stored = simplejpeg.decode_jpeg(data, colorspace="RGB")  # the pixels as stored in the file
    assert exif_orientation(data) == orientation
    assert np.array_equal(decode_rgb(data), displayed_by_definition(stored, orientation))


def test_rotate_90_clockwise_puts_the_stored_top_left_at_the_top_right(exif_jpeg) -> None:
    stored = np.zeros((16, 32, 3), np.uint8)
    stored[:4, :4] = 255
    img = decode_rgb(exif_jpeg(stored, 6))
    assert img.shape == (32, 16, 3)
    assert img[:4, -4:].mean() > 200 and img[:4, :4].mean() < 50


def test_png_with_exif_orientation_is_turned_too() -> None:
    from PIL import Image

    stored = _stored_image()
    exif = Image.Exif()
    exif[0x0112] = 8
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, "PNG", exif=exif.tobytes())
    assert np.array_equal(decode_rgb(buf.getvalue()), displayed_by_definition(stored, 8))


def test_no_or_broken_exif_leaves_the_image_as_stored(exif_jpeg) -> None:
    stored = _stored_image()
    plain = exif_jpeg(stored, None)
    assert exif_orientation(plain) == 1
    assert np.array_equal(decode_rgb(plain), simplejpeg.decode_jpeg(plain, colorspace="RGB"))
    bogus = exif_jpeg(stored, 9)  # out of range: ignored
    assert exif_orientation(bogus) == 1 and decode_rgb(bogus).shape == stored.shape
