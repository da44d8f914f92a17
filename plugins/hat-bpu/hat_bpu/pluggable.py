"""What third-party plugins add to hat-bpu through its hooks (:mod:`hat_bpu.hookspecs`).

Read from the run's plugin manager (``hatcore.plugins.get_plugins()``: the ``hat`` command's,
or the one a test installs with ``set_plugins`` / the ``hat_plugins`` fixture). hat-bpu's
``quantize`` hook receives no plugin manager, so this is the one place hat-bpu reaches for it.
"""

from __future__ import annotations

from typing import Any

from hatcore.errors import UserError


def collect(hook: str, builtin: tuple[str, ...], what: str) -> dict[str, tuple[str, Any]]:
    """Every ``name -> (plugin, value)`` the loaded plugins' ``hook`` implementations return.

    :param hook: ``bpu_observers`` (each returns a dict) or ``bpu_marches`` (a list of records
        with a ``name``).
    :param builtin: hat-bpu's own names, which a plugin may not reuse.
    :param what: ``"observer"`` / ``"march"``, for messages.
    :raises UserError: two plugins (or a plugin and hat-bpu) give the same name, or an
        implementation returns the wrong kind of value.
    """
    from hatcore.plugins import get_plugins

    caller = getattr(get_plugins().hook, hook, None)
    found: dict[str, tuple[str, Any]] = {}
    for impl in caller.get_hookimpls() if caller is not None else []:
        added = impl.function()
        if hook == "bpu_marches":
            if not isinstance(added, (list, tuple)):
                raise UserError(f"plugin {impl.plugin_name!r}: {hook} must return a list of "
                                f"hat_bpu.device.march.March, got {added!r}")
            items = [(getattr(m, "name", None), m) for m in added]
        else:
            if not isinstance(added, dict):
                raise UserError(f"plugin {impl.plugin_name!r}: {hook} must return a dict "
                                f"name -> range rule, got {added!r}")
            items = list(added.items())
        for name, value in items:
            if name in builtin:
                raise UserError(f"plugin {impl.plugin_name!r} adds {what} {name!r}, which "
                                "hat-bpu already has; choose another name")
            if name in found:
                raise UserError(f"{what} {name!r} is added by two plugins: "
                                f"{found[name][0]!r} and {impl.plugin_name!r}")
            found[name] = (impl.plugin_name, value)
    return found
