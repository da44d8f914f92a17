"""``hat plugin new NAME --kind K``: write a ready third-party plugin package.

The package is a working example of its kind - ``pyproject.toml`` with the ``hat`` entry point,
a hookimpl module, a test using the :mod:`hatcore.testing` fixtures and a README - so that
``pip install -e ./hat-NAME && pytest hat-NAME`` passes straight away. The templates are the
files under ``templates/`` (``*.tmpl``, ``string.Template``: ``${module}``, ``${type}`` ...); docs/plugins.md
shows each kind's module, checked against them by the tests (``python -m hatcore.scaffold
docs/plugins.md`` rewrites those blocks).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

import click
import tomllib

from hatcore import __version__
from hatcore.errors import UserError

ORDER = ("backbone", "dataset", "transform", "metric", "backend", "observer", "march", "command",
         "stage")


def _kinds() -> dict[str, dict[str, Any]]:
    """Each kind's ``templates/<kind>/kind.toml``: ``what`` it provides, ``requires`` (the
    distributions its example builds on, beyond hatcore)."""
    root = resources.files("hatcore.scaffold").joinpath("templates")
    found = {d.name: tomllib.loads(d.joinpath("kind.toml").read_text())
             for d in root.iterdir() if d.is_dir() and d.joinpath("kind.toml").is_file()}
    return {k: found[k] for k in sorted(found, key=lambda k: (ORDER + (k,)).index(k))}


KINDS: dict[str, str] = {k: v["what"] for k, v in _kinds().items()}
"""The kinds ``hat plugin new`` writes (a folder under ``templates/`` each), with what each
example provides."""

NAME_RE = re.compile(r"^[a-z][a-z0-9]*([_-][a-z0-9]+)*$")


@dataclass(frozen=True)
class Names:
    """Every name derived from ``hat plugin new NAME``."""

    entry: str   # entry-point name and type name stem: "my-net" -> "my-net"
    dist: str    # distribution: "hat-my-net"
    module: str  # import package: "hat_my_net"
    type: str    # recipe type name / command name: "my_net"
    cls: str     # class-name stem: "MyNet"

    @classmethod
    def of(cls, name: str) -> Names:
        if not NAME_RE.match(name):
            raise UserError(f"plugin name {name!r}: expected lower-case letters and digits, "
                            "words joined by - or _, starting with a letter (e.g. my-backbone)")
        stem = re.sub(r"^hat[-_]", "", name)
        if not stem:
            raise UserError(f"plugin name {name!r}: give a name after 'hat-'")
        words = re.split(r"[-_]", stem)
        return cls(entry=stem, dist=f"hat-{stem.replace('_', '-')}",
                   module="hat_" + "_".join(words), type="_".join(words),
                   cls="".join(w.capitalize() for w in words))


def _template(rel: str) -> Template:
    return Template(resources.files("hatcore.scaffold").joinpath("templates", rel + ".tmpl")
                    .read_text())


def files(name: str, kind: str) -> dict[str, str]:
    """The package of ``hat plugin new NAME --kind KIND``: relative path -> text."""
    if kind not in KINDS:
        raise UserError(f"--kind {kind!r}: expected one of {', '.join(KINDS)}")
    n = Names.of(name)
    requires = _kinds()[kind].get("requires", [])
    deps = ", ".join(f'"{d}"' for d in [f"hatcore>={__version__}", *requires])
    values = {"entry": n.entry, "dist": n.dist, "module": n.module, "type": n.type,
              "Class": n.cls, "kind": kind, "what": KINDS[kind], "deps": deps,
              "hatcore_version": __version__}
    values["usage"] = _template(f"{kind}/usage.md").substitute(values).strip()
    return {
        "pyproject.toml": _template("common/pyproject.toml").substitute(values),
        "README.md": _template("common/README.md").substitute(values),
        f"{n.module}/__init__.py": f'"""{n.dist}: {KINDS[kind]}."""\n\n__version__ = "0.1.0"\n',
        f"{n.module}/plugin.py": _template(f"{kind}/plugin.py").substitute(values),
        f"tests/test_{n.module}.py": _template(f"{kind}/test_plugin.py").substitute(values),
    }


def new_plugin(name: str, kind: str, dest: Path) -> list[Path]:
    """Write the package into ``dest`` (which must not exist or be empty); returns the files."""
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UserError(f"{dest} already exists and is not empty; choose another --dir")
    written = []
    for rel, text in files(name, kind).items():
        path = dest / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


# --------------------------------------------------------------------------- the docs' copies

DOC_MARK = re.compile(r"<!-- scaffold (?P<kind>\w+) (?P<name>[\w-]+) (?P<file>[\w./]+) -->\n"
                      r"```(?P<lang>\w*)\n(?P<body>.*?)```\n", re.S)


def sync_docs(path: Path, check: bool = False) -> list[str]:
    """Make each ``<!-- scaffold KIND NAME FILE -->`` code block of ``path`` the scaffold's file.

    :param check: only report the stale blocks (the tests), do not rewrite.
    :returns: the stale blocks, as ``KIND NAME FILE``.
    """
    text = path.read_text()
    stale: list[str] = []

    def fill(m: re.Match[str]) -> str:
        name, kind, rel = m["name"], m["kind"], m["file"]
        generated = files(name, kind)
        key = next((k for k in generated if k == rel or k.endswith("/" + rel)), None)
        if key is None:
            raise UserError(f"{path}: the {kind} scaffold has no file {rel!r}")
        if m["body"] != generated[key]:
            stale.append(f"{kind} {name} {rel}")
        return f"<!-- scaffold {kind} {name} {rel} -->\n```{m['lang']}\n{generated[key]}```\n"

    new = DOC_MARK.sub(fill, text)
    if not check and new != text:
        path.write_text(new)
    return stale


# --------------------------------------------------------------------------- the command


@click.group("plugin")
def plugin_group() -> None:
    """Write and inspect third-party plugins (`hat plugins` lists installed ones)."""


@plugin_group.command("new")
@click.argument("name")
@click.option("--kind", type=click.Choice(list(KINDS)), default="backbone", show_default=True,
              help="What the example plugin provides.")
@click.option("--dir", "dest", type=click.Path(path_type=Path), default=None,
              help="Where to write the package (default: ./hat-NAME).")
def new_cmd(name: str, kind: str, dest: Path | None) -> None:
    """Write a ready plugin package NAME: pyproject.toml with the `hat` entry point, a
    working example of KIND, a test using the hatcore.testing fixtures and a README.

    Then: `pip install -e ./hat-NAME && pytest hat-NAME` (the test passes as written).
    """
    n = Names.of(name)
    dest = dest if dest is not None else Path(n.dist)
    written = new_plugin(name, kind, dest)
    click.echo(f"wrote {n.dist} ({kind}: {KINDS[kind]}) into {dest}/:")
    for path in written:
        click.echo(f"  {path.relative_to(dest)}")
    click.echo(f"next: pip install -e {dest} && pytest {dest}")


def main(argv: list[str]) -> int:
    stale = [s for p in argv if not p.startswith("-")
             for s in sync_docs(Path(p), check="--check" in argv)]
    for s in stale:
        print(f"scaffold block {s} {'is stale' if '--check' in argv else 'rewritten'}",
              file=sys.stderr)
    return 1 if stale and "--check" in argv else 0
