"""The run context every ``hat`` command receives as click's ``ctx.obj``.

Plugin commands take it with :data:`pass_hat` and load a recipe through it; they never import
the pipeline::

    @click.command("check")
    @click.argument("recipe", type=click.Path(path_type=Path))
    @pass_hat
    def check_cmd(hat: HatContext, recipe: Path) -> None:
        run = hat.load(recipe)          # the recipe's run: build_model, loader, predictor ...
        model = run.build_model()
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click

from hatcore.plugins import Plugins, get_plugins

if TYPE_CHECKING:
    from hatcore.pipeline import Pipeline


class HatContext:
    """What a command runs under: the plugin manager, the ``--debug`` flag, recipe loading."""

    def __init__(self, plugins: Plugins | None = None, debug: bool = False) -> None:
        self._plugins = plugins
        self.debug = debug

    @property
    def plugins(self) -> Plugins:
        """The plugin manager of this invocation (built on first use)."""
        if self._plugins is None:
            self._plugins = get_plugins()
        return self._plugins

    def load(self, recipe: Path, overrides: Sequence[str] = ()) -> Pipeline:
        """The run of ``recipe`` (with ``--set`` overrides), built through this context's plugins.

        :raises UserError: the file is missing; RecipeError for a bad recipe.
        """
        from hatcore.pipeline import Pipeline

        return Pipeline.load(recipe, tuple(overrides), plugins=self.plugins)


pass_hat = click.make_pass_decorator(HatContext, ensure=True)
"""Decorator handing a command the :class:`HatContext` (made on demand outside ``hat``)."""
