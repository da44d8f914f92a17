"""The table of recipe ``type`` names: which plugin provides each, and the attrs class of its spec.

Filled through the ``hat_components(register)`` hook. It refuses duplicates, lists every name
with its plugin and distribution, answers an unknown name with the close ones, and knows each
kind's default type: the one an installed plugin registered with ``default=True`` (the core
names no type of its own). Which distribution a recipe needs is the recipe's to say
(``task.requires``), checked before anything runs.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Protocol


class Register(Protocol):
    def __call__(self, kind: str, name: str, spec_cls: type, doc: str = "", *,
                 default: bool = False) -> None: ...


@dataclass(frozen=True)
class Component:
    kind: str
    name: str
    spec_cls: type
    plugin: str
    doc: str = ""
    distribution: str = "?"
    default: bool = False


class DuplicateComponentError(Exception):
    """Two plugins claim the same ``(kind, name)``."""


class Registry:
    """``(kind, name) -> Component``, filled by plugins, read by recipes and the CLI."""

    def __init__(self, distributions: set[str] | None = None) -> None:
        self._items: dict[tuple[str, str], Component] = {}
        self.distributions = distributions
        """The distributions of the loaded plugins (None: unknown, e.g. a bare registry)."""

    def register(self, kind: str, name: str, spec_cls: type, doc: str = "", *,
                 default: bool = False, plugin: str, distribution: str = "?") -> None:
        key = (kind, name)
        if key in self._items:
            other = self._items[key].plugin
            raise DuplicateComponentError(
                f"{kind} type {name!r} is provided by two plugins: {other!r} and {plugin!r}; "
                f"uninstall one of them or set HAT_LOAD_PLUGINS to choose"
            )
        self._items[key] = Component(kind, name, spec_cls, plugin, doc, distribution, default)

    def defaults(self, kind: str) -> list[Component]:
        return [c for c in self._items.values() if c.kind == kind and c.default]

    def default(self, kind: str) -> Component | None:
        """The type an installed plugin declared the default of ``kind``; None when no plugin
        or several do (then a recipe must name the type)."""
        found = self.defaults(kind)
        return found[0] if len(found) == 1 else None

    def kind_hint(self, kind: str) -> str:
        """What is installed for ``kind``, for messages about a missing or defaulted type."""
        several = self.defaults(kind)
        if len(several) > 1:
            return f"several plugins declare a default {kind}: " + ", ".join(
                f"{c.name} ({c.distribution})" for c in several) + "; name one with `type`"
        names = self.names(kind)
        if not names:
            return f"no installed plugin provides any {kind} type"
        return f"installed {kind} types: " + ", ".join(
            f"{n} ({self._items[(kind, n)].distribution})" for n in names)

    def get(self, kind: str, name: str) -> Component | None:
        return self._items.get((kind, name))

    def names(self, kind: str) -> list[str]:
        return sorted(n for k, n in self._items if k == kind)

    def by_plugin(self, plugin: str) -> list[Component]:
        return [c for c in self._items.values() if c.plugin == plugin]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(sorted(self._items.values(), key=lambda c: (c.kind, c.name)))

    def unknown_message(self, kind: str, name: str) -> str:
        """The one-line answer to an unknown ``type = name`` of ``kind``."""
        names = self.names(kind)
        msg = f"unknown {kind} type {name!r}"
        close = difflib.get_close_matches(name, names, n=1)
        if close:
            msg += f"; did you mean {close[0]!r}?"
        if names:
            listed = ", ".join(f"{n} ({self._items[(kind, n)].plugin})" for n in names)
            msg += f" Valid {kind} types: {listed}"
        else:
            msg += f" (no installed plugin provides any {kind} type)"
        if not close:
            msg += ("; if a plugin you have not installed provides it, install it and list its "
                    "distribution in task.requires")
        return msg
