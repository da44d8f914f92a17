"""What a plugin author relies on: broken plugins named and left out, and the hatcore.testing
fixtures (loaded here the way a plugin's own tests get them: through the ``pytest11`` entry
point of the installed hatcore)."""

from __future__ import annotations

import importlib
import json
import sys
import types
from importlib.metadata import EntryPoint

import pluggy
import pytest
import tomllib
from click.testing import CliRunner

from hatcore import hookimpl
from hatcore.plugins import make_plugin_manager, set_plugins
from hatcore.recipe import ModelSpec, spec
from hatcore.testing import TinySquares, merge, tiny_sections, to_toml

# --------------------------------------------------------------------------- broken plugins


@spec
class _WidgetSpec(ModelSpec):
    pass


def _module(name: str, **hooks: object) -> types.ModuleType:
    mod = types.ModuleType(name)
    for key, fn in hooks.items():
        setattr(mod, key, hookimpl(fn))  # type: ignore[call-overload]
    return mod


def _bad_signature(spec, nonsense):  # type: ignore[no-untyped-def]
    return None


def _misspelt(spec):  # type: ignore[no-untyped-def]
    return None


def _raises(register):  # type: ignore[no-untyped-def]
    register("model", "half_registered", _WidgetSpec)
    raise RuntimeError("cannot find my data files")


def _specs_module() -> types.ModuleType:
    specs = types.ModuleType("hat_test_gadget_specs")

    def build_gadget(spec):  # type: ignore[no-untyped-def]
        """Build a gadget."""

    specs.build_gadget = pluggy.HookspecMarker("hat")(firstresult=True)(build_gadget)  # type: ignore[attr-defined]
    return specs


@pytest.fixture
def broken_installed(monkeypatch):  # type: ignore[no-untyped-def]
    """Entry points for broken plugins beside the installed toy plugin (and a hook provider)."""
    specs = _specs_module()
    modules = {
        "hat_test_badsig": _module("hat_test_badsig", build_model=_bad_signature),
        "hat_test_misspelt": _module("hat_test_misspelt", build_modle=_misspelt),
        "hat_test_raises": _module("hat_test_raises", hat_components=_raises),
        "hat_test_provider": _module(
            "hat_test_provider", hat_addhooks=lambda pluginmanager: pluginmanager.add_hookspecs(specs)),
        # implements the provider's hook with an argument it does not have: found only when the
        # provider adds its spec, after both were registered
        "hat_test_latebad": _module("hat_test_latebad", build_gadget=lambda spec, colour: None),
    }
    for name, mod in modules.items():
        monkeypatch.setitem(sys.modules, name, mod)
    eps = [EntryPoint(name=n.removeprefix("hat_test_"), value=n, group="hat") for n in modules]
    eps.insert(0, EntryPoint(name="noimport", value="hat_test_no_such_module", group="hat"))
    import hatcore.plugins as mod

    real = mod.entry_points
    monkeypatch.setattr(mod, "entry_points", lambda group: [*real(group=group), *eps])
    return {"toy", "noimport", *(e.name for e in eps)}


def test_broken_plugins_are_left_out_by_name_and_the_others_load(broken_installed, capsys) -> None:
    plugins = make_plugin_manager(only=broken_installed)
    assert set(plugins.failed) == {"noimport", "badsig", "misspelt", "raises", "latebad"}
    assert plugins.failed["noimport"].startswith("ModuleNotFoundError")
    assert "build_model" in plugins.failed["badsig"] and "nonsense" in plugins.failed["badsig"]
    assert plugins.failed["misspelt"].startswith("implements build_modle, which no loaded plugin "
                                                 "declares")
    assert plugins.failed["raises"] == ("hat_components raised RuntimeError: cannot find my data "
                                        "files")
    assert "build_gadget" in plugins.failed["latebad"] and "colour" in plugins.failed["latebad"]
    # the others work: the toy plugin's types, the provider's hook
    assert {"toy", "provider"} <= set(plugins.info)
    assert not set(plugins.failed) & set(plugins.info)
    assert plugins.registry.get("model", "toy_detector").plugin == "toy"
    assert plugins.registry.get("model", "half_registered") is None  # all of a plugin or nothing
    assert plugins.hook.build_gadget(spec="x") is None  # the bad implementation is not called
    err = capsys.readouterr().err
    for name in plugins.failed:
        assert f"hat: plugin {name!r} (?) failed to load:" in err


def test_hat_plugins_reports_the_broken_ones(broken_installed) -> None:
    from hatcore.cli import cli

    set_plugins(make_plugin_manager(only=broken_installed))
    try:
        text = CliRunner().invoke(cli, ["plugins"])
        data = CliRunner().invoke(cli, ["plugins", "--json"])
    finally:
        set_plugins(None)
    assert text.exit_code == 0 and data.exit_code == 0
    assert "misspelt  FAILED TO LOAD: implements build_modle" in text.output
    assert "toy  (hat-toy 0.0.1)" in text.output
    assert set(json.loads(data.output)["failed"]) == {"noimport", "badsig", "misspelt", "raises",
                                                       "latebad"}


def test_a_broken_plugin_of_the_callers_own_still_raises() -> None:
    """``extra`` plugins are the caller's code (a test, an embedding): an error, as pluggy's."""
    with pytest.raises(pluggy.PluginValidationError, match="nonsense"):
        make_plugin_manager(entrypoints=False,
                            extra=[("mine", _module("mine", build_model=_bad_signature))])
    with pytest.raises(pluggy.PluginValidationError, match="build_modle"):
        make_plugin_manager(entrypoints=False,
                            extra=[("mine", _module("mine", build_modle=_misspelt))])


# --------------------------------------------------------------------------- hatcore.testing


def test_the_harness_is_a_pytest11_plugin_of_hatcore() -> None:
    from importlib.metadata import entry_points

    eps = {ep.name: ep for ep in entry_points(group="pytest11")}
    assert eps["hatcore"].value == "hatcore.testing"
    assert eps["hatcore"].dist is not None and eps["hatcore"].dist.name == "hatcore"


def test_tiny_recipe_merges_tables_and_replaces_other_types(tiny_recipe) -> None:
    path = tiny_recipe(model={"type": "my_net", "depth": 3},
                       data={"train": {"batch_size": 2, "transforms": [{"type": "t", "p": 1.0}]}},
                       predict=None)
    recipe = tomllib.loads(path.read_text())
    assert recipe["model"] == {"type": "my_net", "depth": 3}  # another type: replaced
    assert recipe["data"]["train"] == {"type": "tiny_squares", "length": 8, "batch_size": 2,
                                       "transforms": [{"type": "t", "p": 1.0}]}  # merged
    assert "predict" not in recipe
    assert recipe["task"]["work_dir"] == str(path.parent / "work")


def test_to_toml_round_trips_the_tiny_sections() -> None:
    sections = merge(tiny_sections("w"), {"export": {"input_shape": [1, 3, 32, 32]},
                                          "task": {"requires": ["hat-x>=0.1"]}})
    assert tomllib.loads(to_toml(sections)) == sections


def test_tiny_squares_boxes_frame_the_square(tiny_dataset) -> None:
    assert isinstance(tiny_dataset, TinySquares) and len(tiny_dataset) == 8
    for i in range(len(tiny_dataset)):
        item = tiny_dataset[i]
        x0, y0, x1, y1 = (int(v) for v in item["gt_boxes"][0])
        channel = int(item["gt_labels"][0]) % 3
        inside = item["img"][channel, y0:y1, x0:x1]
        assert float(inside.min()) == pytest.approx(0.9)
        assert float(item["img"][channel].sum()) == pytest.approx(
            0.9 * (x1 - x0) * (y1 - y0) - 0.5 * (32 * 32 - (x1 - x0) * (y1 - y0)))


def test_run_tiny_trains_one_float_epoch_and_scores_it(hat_plugins, tiny_recipe, run_tiny) -> None:
    plugins = hat_plugins()
    assert plugins.registry.get("model", "tiny_detector").plugin == "hat-testing"
    run = run_tiny(tiny_recipe())
    assert run.stage_state("float")["status"] == "done"
    log = [json.loads(line) for line in (run.work_dir / "float" / "log.jsonl").read_text()
           .splitlines()]
    assert [r["iter"] for r in log if r.get("kind") == "iter"] == [0, 1]  # 8 images, batch 4
    assert run.metrics("float")["stage"] == "float"
    assert run.metrics("float")["bbox"]["AP"] in {0.0, 0.25, 0.5, 0.75, 1.0}  # 4 val images
    assert not (run.work_dir / "calibration").exists()


def test_run_tiny_deploy_skips_without_a_quantizer(hat_plugins, tiny_recipe, run_tiny) -> None:
    hat_plugins()
    with pytest.raises(pytest.skip.Exception, match="no loaded plugin provides a quantizer"):
        run_tiny(tiny_recipe(), deploy=True)


def test_hat_plugins_fixture_fails_on_a_plugin_that_is_not_installed(hat_plugins) -> None:
    with pytest.raises(pytest.fail.Exception, match="no installed plugin is named 'hat-nope'"):
        hat_plugins(load=["hat-nope"])


def test_hat_cli_runs_under_the_fixture_plugins(hat_plugins, hat_cli) -> None:
    hat_plugins(load=["hat-toy"])
    rows = {r["name"]: r for r in json.loads(hat_cli("plugins", "--json").output)["plugins"]}
    assert set(rows) == {"hatcore.builtin", "hatcore.callbacks", "hat-testing", "toy"}


def test_the_guide_gives_every_hook_its_exact_signature() -> None:
    """docs/plugins.md §2 lists each hook as hooks.md heads it (the generated page stays the
    reference); a changed signature must be changed in the guide too."""
    import inspect
    from pathlib import Path

    from hatcore import docgen, hookspecs

    guide = (Path(__file__).resolve().parent.parent / "docs" / "plugins.md").read_text()
    modules = [hookspecs]
    for name in ("hat_fcos.hookspecs", "hat_bpu.hookspecs"):  # the plugins' own hooks
        try:
            modules.append(importlib.import_module(name))
        except ImportError:
            pass
    missing = []
    for mod in modules:
        for name, fn in vars(mod).items():
            if inspect.isfunction(fn) and hasattr(fn, "hat_spec"):
                sig = str(inspect.signature(fn)).replace("'", "")
                if f"`{name}{sig}`" not in guide:
                    missing.append(f"{name}{sig}")
    assert missing == [], f"docs/plugins.md lacks these hook signatures: {missing}"
    assert len(docgen.hook_names()) == len([n for n in docgen.hook_names() if f"`{n}(" in guide])


def test_run_tiny_deploy_runs_the_installed_backend(hat_plugins, tiny_recipe, run_tiny) -> None:
    """calibration → export → compile → both deployed rows, on whatever backend is installed
    (the stage table names the files; the harness names no backend)."""
    pytest.importorskip("hat_bpu")
    plugins = hat_plugins(load=["hat-bpu"])
    run = run_tiny(tiny_recipe(export={"input_shape": [1, 3, 32, 32]}), deploy=True)
    table = plugins.stage_table()
    deployed = [s for s in table if s.deployed]
    assert [s.name for s in deployed] == ["export", "compile"]
    for stage in ("calibration", *(s.name for s in deployed)):
        assert run.stage_state(stage)["status"] == "done", stage
    for s in deployed:
        assert run.pipe.artifact(s.name).is_file(), s.name
        assert run.metrics(s.predict)["stage"] == s.predict
    assert run.metrics("calibration")["stage"] == "calibration"
