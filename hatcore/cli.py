"""The ``hat`` command line. Plugins add commands through the ``register_commands`` hook.

Exit status: 0 done; 2 a user mistake (recipe, arguments, missing file) with a short message
and no traceback (``--debug`` shows it); 1 anything else.
"""

from __future__ import annotations

import json
import sys
import traceback
from typing import Any

import click

from hatcore import __version__
from hatcore.errors import UserError
from hatcore.plugins import get_plugins


class HatGroup(click.Group):
    """A group that turns ``UserError`` into exit 2 and a clean message."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as exc:
            if ctx.obj and ctx.obj.get("debug"):
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
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


@cli.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins_cmd(as_json: bool) -> None:
    """List installed plugins: distribution, version, hooks and the type names they provide."""
    plugins = get_plugins()
    rows = []
    for name, info in plugins.info.items():
        types = [f"{c.kind}:{c.name}" for c in plugins.registry.by_plugin(name)]
        rows.append({"name": name, "distribution": info.distribution, "version": info.version,
                     "hooks": info.hooks, "types": types})
    if as_json:
        click.echo(json.dumps({"plugins": rows, "failed": plugins.failed}, indent=2))
        return
    for row in rows:
        click.echo(f"{row['name']}  ({row['distribution']} {row['version']})")
        click.echo(f"  hooks: {', '.join(row['hooks']) or '-'}")
        click.echo(f"  types: {', '.join(row['types']) or '-'}")
    for name, err in plugins.failed.items():
        click.echo(f"{name}  FAILED TO LOAD: {err}")


def _add_plugin_commands() -> None:
    get_plugins().hook.register_commands(cli=cli)


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    from hatcore import commands  # noqa: F401  (the core's own commands register on import)

    try:
        _add_plugin_commands()
    except UserError as exc:
        click.echo(f"hat: error: {exc}", err=True)
        sys.exit(2)
    cli.main(args=argv, prog_name="hat")
