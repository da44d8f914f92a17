"""Docs that cannot drift: every hook documented and tested, generated references up to date."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hatcore import docgen

ROOT = Path(__file__).resolve().parent.parent
TEST_DIRS = [ROOT / "tests", *sorted((ROOT / "plugins").glob("*/tests"))]


@pytest.mark.parametrize("hook", docgen.hook_names())
def test_plugin_hooks_are_documented(hook: str) -> None:
    text = (ROOT / "docs" / "hooks.md").read_text()
    assert re.search(rf"^## `{hook}\(", text, re.M), f"{hook} has no heading in docs/hooks.md"


@pytest.mark.parametrize("hook", docgen.hook_names())
def test_plugin_hooks_have_tests(hook: str) -> None:
    names = set()
    for d in TEST_DIRS:
        for f in d.rglob("test_*.py"):
            names.update(re.findall(r"^\s*def (test_hook_\w+)", f.read_text(), re.M))
    assert any(n == f"test_hook_{hook}" or n.startswith(f"test_hook_{hook}_") for n in names), (
        f"no test named test_hook_{hook}[_...] in {', '.join(str(d) for d in TEST_DIRS)}")


def test_hookspecs_have_param_docs() -> None:
    import inspect

    from hatcore import hookspecs

    for hook in docgen.hook_names():
        fn = getattr(hookspecs, hook)
        doc = fn.__doc__ or ""
        for param in inspect.signature(fn).parameters:
            assert f":param {param}:" in doc, f"{hook}: parameter {param} undocumented"


def test_generated_docs_are_up_to_date() -> None:
    for path, text in docgen.generate().items():
        assert path.read_text() == text, f"{path} is stale: run `python -m hatcore.docgen`"
