"""Shared fixtures: a small generated shapes set (COCO layout) per test session."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner, Result
from hat_coco.shapes import generate


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``root/{train,val}2017`` + ``root/annotations``: 24 train and 12 val images of 160 px."""
    root = tmp_path_factory.mktemp("shapes")
    generate(root, "train", 24, 160, 0)
    generate(root, "val", 12, 160, 0)
    return root


def exif_app1(orientation: int, big_endian: bool = False) -> bytes:
    """A JPEG APP1 segment holding one TIFF IFD with the Orientation tag, built by hand."""
    e = ">" if big_endian else "<"
    tiff = (b"MM" if big_endian else b"II") + struct.pack(e + "HI", 42, 8)
    tiff += struct.pack(e + "H", 1)  # one IFD entry
    tiff += struct.pack(e + "HHI", 0x0112, 3, 1) + struct.pack(e + "HH", orientation, 0)
    tiff += struct.pack(e + "I", 0)  # no next IFD
    payload = b"Exif\x00\x00" + tiff
    return b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload


def jpeg_with_orientation(img_rgb: np.ndarray, orientation: int | None,
                          big_endian: bool = False) -> bytes:
    ok, enc = cv2.imencode(".jpg", cv2.cvtColor(img_rgb, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    data = enc.tobytes()
    if orientation is None:
        return data
    return data[:2] + exif_app1(orientation, big_endian) + data[2:]


@pytest.fixture
def exif_jpeg() -> Callable[..., bytes]:
    """``jpeg_with_orientation``: an RGB array as JPEG bytes carrying an EXIF orientation."""
    return jpeg_with_orientation


@pytest.fixture
def hat() -> Callable[..., Result]:
    """Run ``hat ARGS...`` in-process (core and plugin commands); returns click's Result."""
    import hatcore.commands  # noqa: F401  (the core's commands register on import)
    from hatcore.cli import _add_plugin_commands, cli

    _add_plugin_commands()
    return lambda *args: CliRunner().invoke(cli, [str(a) for a in args])
