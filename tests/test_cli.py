"""The command line: exit codes, messages without tracebacks, --help on every command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from hatcore.cli import cli

HAT = [sys.executable, "-c", "from hatcore.cli import main; main()"]


def run_hat(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HAT, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_misspelt_recipe_key_exits_2_without_traceback(tmp_path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text('[task]\nname = "t"\nwork_dir = "w"\n[model]\ntype = "toy_detector"\n'
                      'num_clases = 3\n[data.val]\ntype = "toy_squares"\n')
    proc = run_hat("run", str(recipe))
    assert proc.returncode == 2
    assert "$.model.num_clases: unknown key 'num_clases'; did you mean 'num_classes'?" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_debug_flag_shows_the_traceback(tmp_path) -> None:
    proc = run_hat("--debug", "run", str(tmp_path / "missing.toml"))
    assert proc.returncode == 2
    assert "no such recipe file" in proc.stderr
    assert "Traceback" in proc.stderr


def test_info_on_a_missing_file_exits_2(tmp_path) -> None:
    proc = run_hat("info", str(tmp_path / "nothing.hbm"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"hat: error: {tmp_path / 'nothing.hbm'}: no such file or folder"


def test_every_command_has_help() -> None:
    import click

    runner = CliRunner()
    names = cli.list_commands(click.Context(cli))
    # the core's commands come from its built-in plugin's register_commands, like any plugin's
    assert {"run", "predict", "export", "compile", "info", "plugins"} <= set(names)
    for name in names:
        result = runner.invoke(cli, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)
        assert "Usage:" in result.output and len(result.output.splitlines()) > 3


def test_hook_describe_file_checkpoint(tmp_path) -> None:
    import torch

    from hatcore.checkpoint import save_checkpoint

    path = tmp_path / "checkpoint-best.pt"
    save_checkpoint(path, {"model": {"w": torch.zeros(2, 3)}, "stage": "float", "epoch": 4})
    proc = run_hat("info", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "HAT checkpoint, format version 1" in proc.stdout
    assert "stage: float  epoch: 4" in proc.stdout
    path.write_bytes(path.read_bytes()[:50])
    proc = run_hat("info", str(path))
    assert proc.returncode == 2 and "not a readable checkpoint" in proc.stderr
