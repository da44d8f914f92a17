"""Shared fixtures: a fresh plugin manager per test, never the process-wide one."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from hatcore.plugins import Plugins, make_plugin_manager, set_plugins


@pytest.fixture
def toy_plugins() -> Iterator[Plugins]:
    """Only the core and the test-only hat-toy plugin (installed through its entry point)."""
    plugins = make_plugin_manager(only={"toy"})
    set_plugins(plugins)
    try:
        yield plugins
    finally:
        set_plugins(None)
