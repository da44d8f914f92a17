"""The core's built-in plugin: registered through the same hooks as any third-party plugin."""

from __future__ import annotations

from pathlib import Path

from hatcore import hookimpl
from hatcore.registry import Register


@hookimpl
def hat_components(register: Register) -> None:
    """The core provides no recipe types of its own."""


@hookimpl
def describe_file(path: Path) -> str | None:
    """Describe a HAT checkpoint (``*.pt``: a state_dict, loaded with weights_only)."""
    if path.suffix != ".pt" or not path.is_file():
        return None
    from hatcore.checkpoint import describe_checkpoint

    return describe_checkpoint(path)
