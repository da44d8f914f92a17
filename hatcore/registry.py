"""The table of recipe ``type`` names: which plugin provides each, and the attrs class of its spec.

Filled through the ``hat_components(register)`` hook. It refuses duplicates, lists every name
and answers an unknown name with the close ones, and knows which distribution to install for
the names of HAT's own plugins when those are absent.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Protocol

# Names provided by HAT's own plugin distributions: when one is asked for and its plugin is
# not installed, the error says which distribution to install.
KNOWN_DISTRIBUTIONS: dict[tuple[str, str], str] = {
    **{("dataset", n): "hat-coco" for n in ("coco", "coco_lmdb", "shapes")},
    **{
        ("transform", n): "hat-coco"
        for n in ("resize", "random_crop", "pad", "random_flip", "augment_hsv", "to_tensor",
                  "normalize")
    },
    ("metric", "coco"): "hat-coco",
    ("model", "fcos"): "hat-fcos",
    ("backbone", "efficientnet"): "hat-fcos",
    ("backbone", "resnet"): "hat-fcos",
    ("neck", "bifpn"): "hat-fcos",
    ("head", "fcos_head"): "hat-fcos",
    ("quantizer", "horizon"): "hat-bpu",
    ("exporter", "hbir"): "hat-bpu",
    ("compiler", "hbm"): "hat-bpu",
}


class Register(Protocol):
    def __call__(self, kind: str, name: str, spec_cls: type, doc: str = "") -> None: ...


@dataclass(frozen=True)
class Component:
    kind: str
    name: str
    spec_cls: type
    plugin: str
    doc: str = ""


class DuplicateComponentError(Exception):
    """Two plugins claim the same ``(kind, name)``."""


class Registry:
    """``(kind, name) -> Component``, filled by plugins, read by recipes and the CLI."""

    def __init__(self) -> None:
        self._items: dict[tuple[str, str], Component] = {}

    def register(self, kind: str, name: str, spec_cls: type, doc: str = "", *, plugin: str) -> None:
        key = (kind, name)
        if key in self._items:
            other = self._items[key].plugin
            raise DuplicateComponentError(
                f"{kind} type {name!r} is provided by two plugins: {other!r} and {plugin!r}; "
                f"uninstall one of them or set HAT_LOAD_PLUGINS to choose"
            )
        self._items[key] = Component(kind, name, spec_cls, plugin, doc)

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
        dist = KNOWN_DISTRIBUTIONS.get((kind, name))
        if dist is not None:
            return (
                f"{kind} type {name!r} is provided by the {dist} plugin, which is not installed "
                f"(pip install {dist})"
            )
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
        return msg
