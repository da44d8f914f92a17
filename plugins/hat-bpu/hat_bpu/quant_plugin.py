"""hat-bpu quantizer hooks (skeleton)."""

from __future__ import annotations

from hatcore import hookimpl
from hatcore.registry import Register


@hookimpl
def hat_components(register: Register) -> None:
    """Nothing registered yet."""
