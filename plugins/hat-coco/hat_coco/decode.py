"""Image decoding: simplejpeg for JPEG (fastest on one thread), OpenCV for the rest.

Images come out in their **displayed** orientation: an EXIF orientation tag (phones store a
portrait photo as a landscape bitmap plus "rotate 90°") is applied, as every viewer and
annotation tool does, so COCO boxes drawn on the displayed image land on the same pixels
(docs/coco.md, "EXIF orientation").
"""

from __future__ import annotations

import io
import warnings

import cv2
import numpy as np

try:
    import simplejpeg
except ImportError:  # pragma: no cover - simplejpeg is a dependency, but keep working without
    simplejpeg = None

ORIENTATION_TAG = 0x0112  # EXIF/TIFF "Orientation"


class DecodeError(ValueError):
    """The bytes are not a decodable image."""


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation (1..8) of encoded image bytes; 1 (as stored) when absent or invalid.

    Only the header is read (Pillow parses the EXIF block without decoding pixels).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                value = im.getexif().get(ORIENTATION_TAG, 1)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def apply_orientation(img: np.ndarray, orientation: int) -> np.ndarray:
    """The stored pixels ``img[H, W, ...]`` turned as EXIF ``orientation`` says to display them.

    2 mirror, 3 rotate 180°, 4 flip upside down, 5 transpose, 6 rotate 90° clockwise,
    7 transverse, 8 rotate 90° counter-clockwise (5-8 swap height and width).
    """
    ops = {
        1: lambda a: a,
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.swapaxes(0, 1),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
        8: lambda a: np.rot90(a, 1),
    }
    return np.ascontiguousarray(ops.get(orientation, ops[1])(img))


def decode_stored(data: bytes) -> np.ndarray:
    """Encoded bytes -> ``np.ndarray[H, W, 3]`` uint8 RGB as stored (EXIF orientation ignored).

    :raises DecodeError: the bytes are empty, truncated or not an image.
    """
    if not data:
        raise DecodeError("empty image data")
    if simplejpeg is not None and data[:2] == b"\xff\xd8":
        try:
            return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
        except ValueError as exc:
            raise DecodeError(f"corrupt JPEG: {exc}") from None
    img = cv2.imdecode(np.frombuffer(data, np.uint8),
                       cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if img is None:
        raise DecodeError("not a decodable image (OpenCV could not read it)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def decode_rgb(data: bytes) -> np.ndarray:
    """Encoded image bytes -> ``np.ndarray[H, W, 3]`` uint8 RGB, in the displayed orientation.

    :raises DecodeError: the bytes are empty, truncated or not an image.
    """
    img = decode_stored(data)
    orientation = exif_orientation(data) if _may_have_exif(data) else 1
    return img if orientation == 1 else apply_orientation(img, orientation)


def _may_have_exif(data: bytes) -> bool:
    """Cheap pre-test so the common EXIF-less JPEG skips Pillow (APP1 'Exif' in the header)."""
    if data[:2] == b"\xff\xd8":
        return b"Exif\x00\x00" in data[:65536]
    return True
