"""The ``hat`` command line. Every command, the core's own included, comes from a plugin's
``register_commands`` hook (the core's from its built-in plugin, ``hatcore.builtin``); each gets
the run context (:class:`hatcore.context.HatContext`) as click's ``ctx.obj``.

Exit status: 0 done; 2 a user mistake (recipe, arguments, missing file) with a short message
and no traceback (``--debug`` shows it); 1 anything else.
"""

from __future__ import annotations

import sys
import traceback
from typing import Any

from hatcore.runtime import apply_process_settings

apply_process_settings()  # before torch (and its OpenMP runtime) loads: docs/trainer.md

import click  # noqa: E402

from hatcore import __version__  # noqa: E402
from hatcore.context import HatContext  # noqa: E402
from hatcore.errors import UserError  # noqa: E402
from hatcore.plugins import Plugins, get_plugins  # noqa: E402


class HatGroup(click.Group):
    """The root group: commands come from the current plugin manager's ``register_commands``;
    a ``UserError`` becomes exit 2 and a clean message."""

    _loaded_for: Plugins | None = None

    def _load(self) -> None:
        plugins = get_plugins()
        if self._loaded_for is plugins:
            return
        self.commands.clear()
        self._loaded_for = plugins
        plugins.hook.register_commands(cli=self)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        self._load()
        return super().get_command(ctx, cmd_name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as exc:
            if isinstance(ctx.obj, HatContext) and ctx.obj.debug:
                traceback.print_exc()
            click.echo(f"hat: error: {exc}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("hat: interrupted (run the same command again to resume)", err=True)
            ctx.exit(130)


@click.group(cls=HatGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hat")
@click.option("--debug", is_flag=True, help="Show tracebacks for user errors too.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """HAT: train detection models and ship them fixed-point to a BPU-style accelerator.

    Start with `hat run RECIPE`; `hat plugins` lists what is installed.
    """
    ctx.obj = HatContext(get_plugins(), debug=debug)


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    try:
        cli.list_commands(click.Context(cli))  # plugins' commands, before parsing
    except UserError as exc:
        click.echo(f"hat: error: {exc}", err=True)
        sys.exit(2)
    cli.main(args=argv, prog_name="hat")
