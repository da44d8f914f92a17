"""hat-fcos test fixtures: one thread, a fresh plugin manager with hat-fcos only."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from hatcore.plugins import Plugins, make_plugin_manager, set_plugins

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)


@pytest.fixture
def fcos_plugins() -> Iterator[Plugins]:
    plugins = make_plugin_manager(only={"hat-fcos"})
    set_plugins(plugins)
    try:
        yield plugins
    finally:
        set_plugins(None)
