"""HAT core: plugin contract, recipes, trainer, pipeline and the ``hat`` command line.

Plugin authors need only::

    from hatcore import hookimpl
"""

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("hat")
"""Marker for plugin hook implementations: ``@hookimpl def build_model(spec): ...``."""

__all__ = ["__version__", "hookimpl"]
