"""The core's built-in plugin: registered through the same hooks as any third-party plugin."""

from __future__ import annotations

from pathlib import Path

import click

from hatcore import hookimpl
from hatcore.registry import Register
from hatcore.stages import Stage


@hookimpl
def hat_components(register: Register) -> None:
    """The core provides no recipe types of its own."""


@hookimpl
def hat_stages() -> list[Stage]:
    """The core's stages: float, calibration, qat, export, compile (hatcore.stages)."""
    from hatcore.stages import CORE_STAGES

    return list(CORE_STAGES)


@hookimpl
def register_commands(cli: click.Group) -> None:
    """The core's commands: run, predict, export, compile, info, plugins, plugin new."""
    from hatcore.commands import COMMANDS

    for command in COMMANDS:
        cli.add_command(command)


@hookimpl
def describe_file(path: Path) -> str | None:
    """Describe a HAT checkpoint (``*.pt``: a state_dict, loaded with weights_only)."""
    if path.suffix != ".pt" or not path.is_file():
        return None
    from hatcore.checkpoint import describe_checkpoint

    return describe_checkpoint(path)
