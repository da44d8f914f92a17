"""Build an FCOS model from a ``[model]`` table through the plugin hooks."""

from __future__ import annotations

from typing import Any

from torch import nn

from hatcore.plugins import Plugins
from hatcore.recipe import ModelSpec, make_converter


def build(plugins: Plugins, **table: Any) -> nn.Module:
    spec = make_converter(plugins.registry).structure({"type": "fcos", **table}, ModelSpec)
    model = plugins.hook.build_model(spec=spec, plugins=plugins)
    assert model is not None
    return model
