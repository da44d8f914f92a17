"""`hat plugin new`: every kind scaffolded, `pip install -e`'d as its README says and found by
`hat plugins`; its own tests (the harness's fixtures, a recipe naming the plugin) pass as
written; broken plugins installed beside them are named and do not stop the others.

One temporary venv layered on the test environment (a ``.pth`` file in its site-packages adds
the test environment's, so hatcore, torch and the real plugins come from there), one
`pip install -e` of every package into it (no network: ``--no-index --no-deps
--no-build-isolation``; setuptools comes from the test environment), then one `hat plugins`
and one `pytest` subprocess of the venv's interpreter over all the scaffolds' tests: honest
(editable installs, entry points read from the installed metadata by fresh interpreters) and
quick.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import tomllib
from click.testing import CliRunner

from hatcore.scaffold import KINDS, Names, files, sync_docs

ROOT = Path(__file__).resolve().parent.parent

BROKEN = {
    # distribution -> (entry point, plugin module source)
    "hat-broken-import": ("broken-import", "import hat_no_such_dependency  # noqa: F401\n"),
    "hat-broken-sig": ("broken-sig", "from hatcore import hookimpl\n\n\n@hookimpl\n"
                                     "def build_model(spec, nonsense):\n    return None\n"),
}


def _broken_package(root: Path, dist: str, entry: str, source: str) -> Path:
    module = dist.replace("-", "_")
    pkg = root / dist
    (pkg / module).mkdir(parents=True)
    (pkg / module / "__init__.py").write_text("")
    (pkg / module / "plugin.py").write_text(source)
    (pkg / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=77"]\nbuild-backend = "setuptools.build_meta"\n'
        f'[project]\nname = "{dist}"\nversion = "0.1.0"\n'
        f'[project.entry-points.hat]\n{entry} = "{module}.plugin"\n')
    return pkg


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HAT_", "PYTEST_")) and k != "PYTHONPATH"}
    return {**env, "OMP_NUM_THREADS": "1"}


def _layered_venv(root: Path) -> tuple[Path, Path]:
    """A venv (no pip of its own) whose site-packages also reads the test environment's:
    ``(python, site-packages)``."""
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; "
                                "print(sysconfig.get_paths()['purelib'])"], check=True,
                               capture_output=True, text=True, timeout=60).stdout.strip())
    outer = sysconfig.get_paths()["purelib"]
    (site / "_hat_test_env.pth").write_text(f"import site; site.addsitedir({outer!r})\n")
    return python, site


@pytest.fixture(scope="module")
def installed(tmp_path_factory):  # type: ignore[no-untyped-def]
    from hatcore.cli import cli

    root = tmp_path_factory.mktemp("scaffolds")
    packages = []
    for kind in KINDS:
        dest = root / f"hat-ex-{kind}"
        result = CliRunner().invoke(cli, ["plugin", "new", f"ex-{kind}", "--kind", kind,
                                          "--dir", str(dest)])
        assert result.exit_code == 0, result.output
        assert f"next: pip install -e {dest} && pytest {dest}" in result.output
        packages.append(dest)
    for dist, (entry, source) in BROKEN.items():
        packages.append(_broken_package(root, dist, entry, source))
    python, site = _layered_venv(root)
    pip = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--no-index", *[a for p in packages for a in ("-e", str(p))]],
        capture_output=True, text=True, timeout=300, env=_env())
    assert pip.returncode == 0, pip.stderr[-3000:]
    return root, python, site


def test_the_scaffolds_are_installed_editable(installed) -> None:
    """`pip install -e`: each package's metadata is in the venv, its code is the scaffold's
    folder (an edit there is live), not a copy."""
    root, python, site = installed
    for kind in KINDS:
        n = Names.of(f"ex-{kind}")
        url = json.loads((site / f"{n.module}-0.1.0.dist-info" / "direct_url.json").read_text())
        assert url["dir_info"] == {"editable": True}, kind
        assert url["url"] == (root / n.dist).as_uri(), kind
    modules = [Names.of(f"ex-{kind}").module for kind in KINDS]
    proc = subprocess.run([str(python), "-c", "import importlib.util; print('\\n'.join("
                           f"importlib.util.find_spec(m + '.plugin').origin for m in {modules!r}))"],
                          cwd=root, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == [str(root / f"hat-ex-{k}" / m / "plugin.py")
                                   for k, m in zip(KINDS, modules, strict=True)]


def test_hat_plugins_lists_every_scaffold_and_names_the_broken_ones(installed) -> None:
    root, python, _ = installed
    proc = subprocess.run([str(python), "-m", "hatcore", "plugins", "--json"], cwd=root,
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    listing = json.loads(proc.stdout)
    rows = {r["name"]: r for r in listing["plugins"]}
    for kind in KINDS:
        assert rows[f"ex-{kind}"]["distribution"] == f"hat-ex-{kind}", kind
        assert rows[f"ex-{kind}"]["version"] == "0.1.0"
    assert "backbone:ex_backbone" in rows["ex-backbone"]["types"]
    assert rows["ex-stage"]["stages"] == ["ex_stage"]
    assert "bpu_observers" in rows["ex-observer"]["hooks"]
    assert "bpu_marches" in rows["ex-march"]["hooks"]
    assert set(listing["failed"]) == {"broken-import", "broken-sig"}
    assert listing["failed"]["broken-import"] == (
        "ModuleNotFoundError: No module named 'hat_no_such_dependency'")
    assert "nonsense" in listing["failed"]["broken-sig"]
    assert "hat: plugin 'broken-sig' (hat-broken-sig) failed to load" in proc.stderr
    assert {"fcos", "coco"} <= set(rows)  # the installed plugins still load


def test_every_scaffold_passes_its_own_tests(installed) -> None:
    """Each kind's test loads the installed plugin through its entry point, checks `hat plugins`
    and runs a tiny recipe naming it (backbone: FCOS trains one epoch; backend: calibration →
    export → compile and both deployed rows; observer: calibration with it; march: quantize,
    export, compile and the perf estimate for it)."""
    root, python, _ = installed
    dirs = [str(root / f"hat-ex-{kind}") for kind in KINDS]
    proc = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *dirs],
                          cwd=root, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:]
    tests = sum(len([n for n in ast.parse(Path(d, "tests", f"test_hat_ex_{k}.py").read_text()).body
                     if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")])
                for d, k in zip(dirs, KINDS, strict=True))
    assert f"{tests} passed" in proc.stdout, proc.stdout[-2000:]
    assert "skipped" not in proc.stdout
    assert "DeprecationWarning" not in proc.stdout  # the examples use current torch APIs


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_scaffold_is_a_package(kind: str) -> None:
    n = Names.of(f"my-{kind}")
    out = files(f"my-{kind}", kind)
    project = tomllib.loads(out["pyproject.toml"])
    assert project["project"]["name"] == n.dist == f"hat-my-{kind}"
    assert project["project"]["entry-points"]["hat"] == {n.entry: f"{n.module}.plugin"}
    assert project["project"]["dependencies"][0].startswith("hatcore>=")
    for rel, text in out.items():
        if rel.endswith(".py"):
            ast.parse(text, rel)  # valid Python once filled in
        assert "${" not in text, rel
    assert f"tests/test_{n.module}.py" in out and "README.md" in out


def test_names_are_derived_and_checked() -> None:
    assert Names.of("hat-res_net2") == Names("res_net2", "hat-res-net2", "hat_res_net2", "res_net2",
                                             "ResNet2")
    from hatcore.cli import cli

    bad = CliRunner().invoke(cli, ["plugin", "new", "My Net"])
    assert bad.exit_code == 2
    assert "plugin name 'My Net': expected lower-case letters" in bad.output
    unknown = CliRunner().invoke(cli, ["plugin", "new", "x", "--kind", "loss"])
    assert unknown.exit_code == 2 and "'loss' is not one of" in unknown.output


def test_an_existing_folder_is_not_overwritten(tmp_path: Path) -> None:
    from hatcore.cli import cli

    (tmp_path / "hat-mine").mkdir()
    (tmp_path / "hat-mine" / "keep.txt").write_text("mine")
    result = CliRunner().invoke(cli, ["plugin", "new", "mine", "--dir", str(tmp_path / "hat-mine")])
    assert result.exit_code == 2
    assert "already exists and is not empty" in result.output
    assert (tmp_path / "hat-mine" / "keep.txt").read_text() == "mine"


def test_the_guide_shows_the_scaffolds_as_they_are() -> None:
    """docs/plugins.md's recipes are the scaffolds' modules (tested above): `python -m
    hatcore.scaffold docs/plugins.md` rewrites them when a template changes."""
    guide = ROOT / "docs" / "plugins.md"
    assert sync_docs(guide, check=True) == []
    shown = {line.split()[2] for line in guide.read_text().splitlines()
             if line.startswith("<!-- scaffold ")}
    assert shown == set(KINDS)
