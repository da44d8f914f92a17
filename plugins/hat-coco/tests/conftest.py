"""Shared fixtures: a small generated shapes set (COCO layout) per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
from hat_coco.shapes import generate


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``root/{train,val}2017`` + ``root/annotations``: 24 train and 12 val images of 160 px."""
    root = tmp_path_factory.mktemp("shapes")
    generate(root, "train", 24, 160, 0)
    generate(root, "val", 12, 160, 0)
    return root
