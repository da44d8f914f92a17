"""The core's own commands: run, predict, export, compile, info."""

from __future__ import annotations

from pathlib import Path

import click

from hatcore.cli import cli
from hatcore.errors import UserError
from hatcore.plugins import get_plugins


@cli.command("info")
@click.argument("file", type=click.Path(path_type=Path))
def info_cmd(file: Path) -> None:
    """Describe and verify FILE: a .hbir, .hbm, LMDB folder or checkpoint."""
    if not file.exists():
        raise UserError(f"{file}: no such file or folder")
    text = get_plugins().hook.describe_file(path=file)
    if text is None:
        raise UserError(f"{file}: not a file any installed plugin recognises "
                        f"(checkpoint .pt, .hbir, .hbm, LMDB folder)")
    click.echo(text)
