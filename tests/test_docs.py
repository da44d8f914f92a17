"""Docs that cannot drift: every hook documented and tested, generated references up to date."""

from __future__ import annotations

import ast
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


def _trivial(test: ast.expr) -> bool:
    """``assert x``, ``assert isinstance(..)``, ``assert x >= 0``: true of almost any result."""
    if isinstance(test, ast.Compare):
        zero = all(isinstance(c, ast.Constant) and c.value in (0, 0.0) for c in test.comparators)
        return zero and all(isinstance(op, (ast.GtE, ast.Gt)) for op in test.ops)
    if isinstance(test, ast.Call) and isinstance(test.func, ast.Name):
        return test.func.id in ("isinstance", "bool", "callable")
    return isinstance(test, (ast.Name, ast.Attribute, ast.Subscript))


def _mentions(node: ast.AST, hook: str, names: set[str]) -> bool:
    for sub in ast.walk(node):
        if isinstance(sub, ast.Attribute) and sub.attr == hook:
            return True
        if isinstance(sub, ast.Name) and (sub.id == hook or sub.id in names):
            return True
        if isinstance(sub, ast.Constant) and sub.value == hook:
            return True
    return False


def _implementers(tree: ast.AST, hook: str) -> set[str]:
    """Classes in ``tree`` with a method named ``hook`` (in-test plugins implementing it)."""
    return {c.name for c in ast.walk(tree) if isinstance(c, ast.ClassDef)
            and any(isinstance(f, ast.FunctionDef) and f.name == hook for f in c.body)}


def hook_result_asserts(fn: ast.FunctionDef, hook: str, seeds: set[str] = frozenset()) -> list[str]:
    """The non-trivial asserts of ``fn`` on what ``hook`` returned or did.

    Tracked as the hook's result: a variable assigned from an expression naming the hook (its
    call, a string, a class implementing it: ``seeds`` and in-test classes), what is passed into
    the hook's call (``cli`` of ``register_commands(cli=cli)``), and what an in-test
    implementation writes to (``seen.append`` in ``def on_epoch_end``). An assert counts when it
    names one of these and is not trivially true (``x >= 0``, ``isinstance``, a bare value).
    """
    names: set[str] = set(seeds) | _implementers(fn, hook)
    for node in ast.walk(fn):
        if isinstance(node, ast.FunctionDef) and node.name == hook and node is not fn:
            names |= {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} - {
                a.arg for a in node.args.args}
        if isinstance(node, ast.Call) and _mentions(node.func, hook, set()):
            for arg in [*node.args, *(k.value for k in node.keywords)]:
                names |= {n.id for n in ast.walk(arg) if isinstance(n, ast.Name)}
    for _ in range(3):  # follow a = hook(..); b = a[0] chains a few steps
        for node in ast.walk(fn):
            targets: list[ast.expr] = []
            if isinstance(node, ast.Assign):
                targets, value = node.targets, node.value
            elif isinstance(node, (ast.AnnAssign, ast.AugAssign)) and node.value is not None:
                targets, value = [node.target], node.value
            elif isinstance(node, ast.For):
                targets, value = [node.target], node.iter
            if targets and _mentions(value, hook, names):
                for t in targets:
                    names |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
    return [ast.unparse(a) for a in ast.walk(fn) if isinstance(a, ast.Assert)
            and not _trivial(a.test) and _mentions(a.test, hook, names)]


def _hook_tests() -> list[tuple[ast.FunctionDef, ast.Module]]:
    found = []
    for d in TEST_DIRS:
        for f in d.rglob("test_*.py"):
            tree = ast.parse(f.read_text())
            found += [(node, tree) for node in tree.body
                      if isinstance(node, ast.FunctionDef) and node.name.startswith("test_hook_")]
    return found


@pytest.mark.parametrize("hook", docgen.hook_names())
def test_plugin_hooks_have_tests(hook: str) -> None:
    tests = [(fn, tree) for fn, tree in _hook_tests()
             if fn.name == f"test_hook_{hook}" or fn.name.startswith(f"test_hook_{hook}_")]
    assert tests, f"no test named test_hook_{hook}[_...] in {', '.join(str(d) for d in TEST_DIRS)}"
    asserting = [fn.name for fn, tree in tests
                 if hook_result_asserts(fn, hook, _implementers(tree, hook))]
    assert asserting, (f"{[fn.name for fn, _ in tests]} never assert on what {hook} returned (an "
                       f"assert naming {hook!r}, or a variable assigned from it; not `x >= 0`, "
                       "`isinstance`, or a bare truth test)")


def test_the_hook_test_check_tells_a_real_assert_from_an_empty_one() -> None:
    def fn(src: str) -> ast.FunctionDef:
        node = ast.parse(src).body[0]
        assert isinstance(node, ast.FunctionDef)
        return node

    real = fn("def test_hook_export_x(pm):\n    desc = pm.hook.export(model=1)\n"
              "    ops = desc['ops']\n    assert ops == 7\n")
    assert hook_result_asserts(real, "export") == ["assert ops == 7"]
    for body in ("    desc = pm.hook.export(model=1)\n    assert desc\n",
                 "    ap = pm.hook.export(model=1)['AP']\n    assert ap >= 0.0\n",
                 "    d = pm.hook.export(model=1)\n    assert isinstance(d, list)\n",
                 "    pm.hook.export(model=1)\n    assert other == 3\n"):
        assert hook_result_asserts(fn("def test_hook_export(pm):\n" + body), "export") == [], body


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


def test_hooks_the_repository_plugins_add_are_in_the_generated_page() -> None:
    """Every spec a repository plugin adds through ``hat_addhooks`` (found here by scanning the
    plugins' ``hookspecs`` modules for pluggy's marker, not through the plugin manager as
    docgen does) has a section in docs/hooks.md under its plugin."""
    import importlib

    text = (ROOT / "docs" / "hooks.md").read_text()
    seen = 0
    for module in ("hat_bpu.hookspecs", "hat_fcos.hookspecs"):
        mod = importlib.import_module(module)
        names = [n for n, f in vars(mod).items() if callable(f) and hasattr(f, "hat_spec")]
        assert names, module
        part = text.split(f"(`{module}`)", 1)
        assert len(part) == 2, f"no section for {module}"
        for name in names:
            assert f"## `{name}(" in part[1].split("\n# Hooks added by", 1)[0], (module, name)
            seen += 1
    assert seen >= 4
