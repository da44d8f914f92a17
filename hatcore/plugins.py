"""Plugin discovery: entry-point group ``hat``, built-ins registered the same way.

Environment:

* ``HAT_LOAD_PLUGINS=hat-coco,hat-fcos`` loads only these (entry-point or distribution names;
  empty loads none). The core's built-in plugin is always loaded.
* ``HAT_TRACE_PLUGINS=1`` logs every hook call and its result to stderr.

A broken installed plugin - one that fails to import, implements a hook with an argument the
hook does not have, implements a hook no loaded plugin declares, or raises in
``hat_components`` - is reported (name and error, on stderr and by ``hat plugins``) and left
out; the others still work.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field
from functools import partial
from importlib.metadata import entry_points
from typing import Any

import pluggy

from hatcore import __version__, hookspecs
from hatcore.errors import UserError
from hatcore.registry import DuplicateComponentError, Registry
from hatcore.stages import Stage, StageTable

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

    def call_owner(self, hook: str, kind: str, spec: Any, *, required: bool = True,
                   **kwargs: Any) -> Any:
        """Call ``hook(spec=spec, **kwargs)`` on the one plugin that registered ``spec.type``.

        The registry is the one source of truth for who builds a type: the other plugins'
        implementations are not called, so an implementation need not re-check the spec's class.
        Wrappers (``@hookimpl(wrapper=True)``: tracing, fault injection) still wrap the call.

        :param required: raise when the owner returns None (else return None).
        :raises UserError: the type is unknown, or its owner returned nothing.
        """
        comp = self.registry.get(kind, spec.type)
        if comp is None:
            raise UserError(self.registry.unknown_message(kind, spec.type))
        owner = self.pm.get_plugin(comp.plugin)
        others = [i.plugin for i in getattr(self.pm.hook, hook).get_hookimpls()
                  if i.plugin is not owner and not (i.wrapper or i.hookwrapper)]
        result = self.pm.subset_hook_caller(hook, remove_plugins=others)(spec=spec, **kwargs)
        if result is None and required:
            raise UserError(f"plugin {comp.plugin!r} provides {kind} type {spec.type!r}, but its "
                            f"{hook} hook returned nothing (a bug in that plugin)")
        return result

    def stage_table(self) -> StageTable:
        """The stage table: every plugin's ``hat_stages``, the core's first (registration order)."""
        return StageTable(st for added in self.stages_by_plugin().values() for st in added)

    def stages_by_plugin(self) -> dict[str, list[Stage]]:
        """What each plugin's ``hat_stages`` returns, in registration order (the core's first)."""
        out: dict[str, list[Stage]] = {}
        for impl in self.pm.hook.hat_stages.get_hookimpls():
            added = impl.function()
            if not isinstance(added, (list, tuple)) or not all(isinstance(s, Stage) for s in added):
                raise UserError(f"plugin {impl.plugin_name!r}: hat_stages must return a list of "
                                f"hatcore.stages.Stage, got {added!r}")
            out[impl.plugin_name] = list(added)
        return out


def _allowed() -> set[str] | None:
    raw = os.environ.get("HAT_LOAD_PLUGINS")
    if raw is None:
        return None
    return {p.strip() for p in raw.split(",") if p.strip()}


class _Manager(pluggy.PluginManager):
    """A plugin manager that, while ``collecting``, notes an invalid hook implementation (an
    argument its spec lacks ...) instead of raising, so one broken plugin can be left out and
    named rather than stopping every other (pluggy checks implementations on ``register`` and
    again when a plugin adds the spec later through ``hat_addhooks``)."""

    def __init__(self) -> None:
        super().__init__("hat")
        self.collecting = False
        self.invalid: dict[str, str] = {}

    def _verify_hook(self, hook: Any, hookimpl: Any) -> None:
        try:
            super()._verify_hook(hook, hookimpl)
        except pluggy.PluginValidationError as exc:
            if not self.collecting:
                raise
            self.invalid.setdefault(hookimpl.plugin_name, " ".join(str(exc).split()))


def _report(failed: dict[str, str], name: str, dist: str, error: str) -> None:
    failed[name] = error
    print(f"hat: plugin {name!r} ({dist}) failed to load: {error}", file=sys.stderr)


def _unknown_hooks(pm: pluggy.PluginManager, plugin: object) -> list[str]:
    """The hooks ``plugin`` implements that no loaded hookspec declares (not optional ones)."""
    return sorted(hc.name for hc in pm.get_hookcallers(plugin) or [] if not hc.has_spec()
                  and any(i.plugin is plugin and not i.optionalhook for i in hc.get_hookimpls()))


def _claim(claims: list[tuple[tuple[Any, ...], dict[str, Any]]], *args: Any, **kwargs: Any
           ) -> None:
    claims.append((args, kwargs))


def make_plugin_manager(
    *, entrypoints: bool = True, extra: list[tuple[str, object]] | None = None,
    only: set[str] | None = None,
) -> Plugins:
    """Build a fresh plugin manager: built-ins, then the ``hat`` entry points, then ``extra``.

    A broken entry-point plugin is left out and named in ``Plugins.failed``; a broken built-in
    or ``extra`` plugin raises (it is the caller's own code).

    :param entrypoints: load installed plugins (tests turn it off to start from a clean slate).
    :param extra: ``(name, plugin object)`` pairs to register too (tests, embedding).
    :param only: load only these entry points / distributions (default: ``HAT_LOAD_PLUGINS``).
    """
    pm = _Manager()
    pm.add_hookspecs(hookspecs)
    info: dict[str, PluginInfo] = {}
    failed: dict[str, str] = {}
    installed: set[str] = set()  # entry-point plugins: left out, not raised, when broken

    for modname in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(modname), name=modname)
        info[modname] = PluginInfo(modname, "hatcore", __version__)

    pm.collecting = True
    if entrypoints:
        allowed = only if only is not None else _allowed()
        for ep in entry_points(group="hat"):
            dist = ep.dist.name if ep.dist else "?"
            if allowed is not None and ep.name not in allowed and dist not in allowed:
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken plugin must not take the others down
                _report(failed, ep.name, dist, f"{type(exc).__name__}: {exc}")
                continue
            if pm.is_registered(plugin):
                continue
            pm.register(plugin, name=ep.name)
            info[ep.name] = PluginInfo(ep.name, dist, ep.dist.version if ep.dist else "?")
            installed.add(ep.name)

    for name, plugin in extra or []:
        pm.register(plugin, name=name)
        info[name] = PluginInfo(name, getattr(plugin, "__module__", name) or name, "-")

    pm.hook.hat_addhooks.call_historic(kwargs={"pluginmanager": pm})
    pm.collecting = False

    def leave_out(name: str, error: str) -> None:
        if name not in installed:  # the caller's own plugin: raise as pluggy would
            raise pluggy.PluginValidationError(pm.get_plugin(name), error)
        pm.unregister(name=name)
        _report(failed, name, info.pop(name).distribution, error)

    for name, error in pm.invalid.items():
        leave_out(name, error)
    for name in sorted(installed - set(failed)):
        unknown = _unknown_hooks(pm, pm.get_plugin(name))
        if unknown:
            leave_out(name, f"implements {', '.join(unknown)}, which no loaded plugin declares "
                            "(a misspelt hook, or a plugin it builds on is not installed)")
    pm.check_pending()
    for name, pi in info.items():
        plugin = pm.get_plugin(name)
        pi.hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])

    registry = Registry({pi.distribution for pi in info.values()})
    for impl in pm.hook.hat_components.get_hookimpls():
        dist = info[impl.plugin_name].distribution if impl.plugin_name in info else "?"
        claims: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        try:  # a plugin's claims count only when its whole hat_components ran
            impl.function(register=partial(_claim, claims))
            for args, kwargs in claims:
                partial(registry.register, plugin=impl.plugin_name, distribution=dist)(
                    *args, **kwargs)
        except DuplicateComponentError:
            raise
        except Exception as exc:
            leave_out(impl.plugin_name, f"hat_components raised {type(exc).__name__}: {exc}")

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
