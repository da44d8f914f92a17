"""``count_ops`` against hand counts and ``hat calops`` on a recipe."""

from __future__ import annotations

from click.testing import CliRunner
from hat_fcos.calops import count_ops
from torch import nn

from hatcore.plugins import make_plugin_manager, set_plugins

RECIPE = """
[task]
name = "calops"
work_dir = "{tmp}"
[model]
type = "fcos"
num_classes = 3
[model.neck]
stack = 1
[data.val]
type = "toy_squares"
"""


def test_count_ops_counts_conv_macs_and_elementwise_ops() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2))
    report = count_ops(model, (1, 3, 8, 8))
    by_name = {la.name: la for la in report.layers}
    assert by_name["0"].macs == 4 * 8 * 8 * 3 * 9 and by_name["0"].params == 3 * 4 * 9 + 4
    assert by_name["1"].other_ops == 4 * 8 * 8 and by_name["1"].macs == 0
    assert by_name["2"].other_ops == 4 * 4 * 4
    assert report.total_flops == 2 * 6912 + 256 + 64
    assert report.total_params == 112
    assert "GFLOPs" in report.table()


def test_hook_register_commands_adds_calops(tmp_path) -> None:
    from hatcore.cli import cli
    from hatcore.plugins import get_plugins

    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE.format(tmp=tmp_path))
    set_plugins(make_plugin_manager(only={"hat-fcos", "toy"}))
    try:
        get_plugins().hook.register_commands(cli=cli)
        res = CliRunner().invoke(cli, ["calops", str(recipe), "--input-shape", "1,3,128,128",
                                       "--top", "3"])
        assert res.exit_code == 0, res.output
        assert "input [1, 3, 128, 128]:" in res.output and "GMACs" in res.output
        assert len(res.output.strip().splitlines()) == 5  # header, 3 layers, totals
        bad = CliRunner().invoke(cli, ["calops", str(recipe), "--input-shape", "1,3"])
        assert bad.exit_code == 2 and "N,C,H,W" in bad.output
    finally:
        set_plugins(None)
