"""Image decoding: simplejpeg for JPEG (fastest on one thread), OpenCV for the rest."""

from __future__ import annotations

import cv2
import numpy as np

try:
    import simplejpeg
except ImportError:  # pragma: no cover - simplejpeg is a dependency, but keep working without
    simplejpeg = None


class DecodeError(ValueError):
    """The bytes are not a decodable image."""


def decode_rgb(data: bytes) -> np.ndarray:
    """Encoded image bytes -> ``np.ndarray[H, W, 3]`` uint8 RGB.

    :raises DecodeError: the bytes are empty, truncated or not an image.
    """
    if not data:
        raise DecodeError("empty image data")
    if simplejpeg is not None and data[:2] == b"\xff\xd8":
        try:
            return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
        except ValueError as exc:
            raise DecodeError(f"corrupt JPEG: {exc}") from None
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise DecodeError("not a decodable image (OpenCV could not read it)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
