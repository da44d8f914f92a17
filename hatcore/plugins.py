"""Plugin discovery: entry-point group ``hat``, built-ins registered the same way.

Environment:

* ``HAT_LOAD_PLUGINS=hat-coco,hat-fcos`` loads only these (entry-point or distribution names;
  empty loads none). The core's built-in plugin is always loaded.
* ``HAT_TRACE_PLUGINS=1`` logs every hook call and its result to stderr.

A plugin that fails to import is reported (name and error) and skipped; the others still work.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field
from functools import partial
from importlib.metadata import entry_points

import pluggy

from hatcore import __version__, hookspecs
from hatcore.registry import Registry

BUILTIN_PLUGINS = ("hatcore.builtin", "hatcore.callbacks")


@dataclass
class PluginInfo:
    name: str
    distribution: str
    version: str
    hooks: list[str] = field(default_factory=list)


@dataclass
class Plugins:
    """The loaded plugin manager with what it found."""

    pm: pluggy.PluginManager
    registry: Registry
    info: dict[str, PluginInfo]
    failed: dict[str, str]

    @property
    def hook(self) -> pluggy.HookRelay:
        return self.pm.hook


def _allowed() -> set[str] | None:
    raw = os.environ.get("HAT_LOAD_PLUGINS")
    if raw is None:
        return None
    return {p.strip() for p in raw.split(",") if p.strip()}


def make_plugin_manager(
    *, entrypoints: bool = True, extra: list[tuple[str, object]] | None = None,
    only: set[str] | None = None,
) -> Plugins:
    """Build a fresh plugin manager: built-ins, then the ``hat`` entry points, then ``extra``.

    :param entrypoints: load installed plugins (tests turn it off to start from a clean slate).
    :param extra: ``(name, plugin object)`` pairs to register too (tests, embedding).
    :param only: load only these entry points / distributions (default: ``HAT_LOAD_PLUGINS``).
    """
    pm = pluggy.PluginManager("hat")
    pm.add_hookspecs(hookspecs)
    info: dict[str, PluginInfo] = {}
    failed: dict[str, str] = {}

    for modname in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(modname), name=modname)
        info[modname] = PluginInfo(modname, "hatcore", __version__)

    if entrypoints:
        allowed = only if only is not None else _allowed()
        for ep in entry_points(group="hat"):
            dist = ep.dist.name if ep.dist else "?"
            if allowed is not None and ep.name not in allowed and dist not in allowed:
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken plugin must not take the others down
                failed[ep.name] = f"{type(exc).__name__}: {exc}"
                print(f"hat: plugin {ep.name!r} ({dist}) failed to load: {failed[ep.name]}",
                      file=sys.stderr)
                continue
            if pm.is_registered(plugin):
                continue
            pm.register(plugin, name=ep.name)
            info[ep.name] = PluginInfo(ep.name, dist, ep.dist.version if ep.dist else "?")

    for name, plugin in extra or []:
        pm.register(plugin, name=name)
        info[name] = PluginInfo(name, getattr(plugin, "__module__", name) or name, "-")

    pm.hook.hat_addhooks.call_historic(kwargs={"pluginmanager": pm})
    pm.check_pending()
    for name, pi in info.items():
        plugin = pm.get_plugin(name)
        pi.hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])

    registry = Registry()
    for impl in pm.hook.hat_components.get_hookimpls():
        impl.function(register=partial(registry.register, plugin=impl.plugin_name))

    if os.environ.get("HAT_TRACE_PLUGINS"):
        pm.trace.root.setwriter(lambda msg: print(msg, end="", file=sys.stderr))
        pm.enable_tracing()
    return Plugins(pm, registry, info, failed)


_current: Plugins | None = None


def get_plugins() -> Plugins:
    """The process-wide plugin manager, built on first use."""
    global _current
    if _current is None:
        _current = make_plugin_manager()
    return _current


def set_plugins(plugins: Plugins | None) -> None:
    """Replace the process-wide plugin manager (tests; ``None`` rebuilds on next use)."""
    global _current
    _current = plugins
