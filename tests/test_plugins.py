"""Plugin discovery, the type registry and `hat plugins`."""

from __future__ import annotations

import json
import types
from importlib.metadata import EntryPoint

import pytest
from click.testing import CliRunner

from hatcore import hookimpl
from hatcore.plugins import make_plugin_manager, set_plugins
from hatcore.recipe import ModelSpec, option, spec
from hatcore.registry import DuplicateComponentError


@spec
class _TinySpec(ModelSpec):
    width: int = option(1, doc="width")


class _Provider:
    def __init__(self, name: str = "tiny") -> None:
        self.name = name

    @hookimpl
    def hat_components(self, register):  # type: ignore[no-untyped-def]
        register("model", self.name, _TinySpec, "a tiny model")


def test_entry_point_discovery_finds_the_toy_plugin() -> None:
    plugins = make_plugin_manager(only={"hat-toy"})
    assert "toy" in plugins.info
    assert plugins.info["toy"].distribution == "hat-toy"
    assert "build_model" in plugins.info["toy"].hooks
    assert plugins.registry.get("model", "toy_detector").plugin == "toy"


def test_builtins_are_registered_like_plugins() -> None:
    plugins = make_plugin_manager(entrypoints=False)
    assert "hatcore.builtin" in plugins.info
    assert "describe_file" in plugins.info["hatcore.builtin"].hooks


def test_hook_hat_components_fills_the_registry_and_refuses_duplicates() -> None:
    plugins = make_plugin_manager(entrypoints=False, extra=[("one", _Provider())])
    assert plugins.registry.names("model") == ["tiny"]
    with pytest.raises(DuplicateComponentError) as err:
        make_plugin_manager(entrypoints=False, extra=[("one", _Provider()), ("two", _Provider())])
    assert str(err.value) == (
        "model type 'tiny' is provided by two plugins: 'one' and 'two'; "
        "uninstall one of them or set HAT_LOAD_PLUGINS to choose"
    )


def test_unknown_type_message_lists_valid_names_and_plugins() -> None:
    plugins = make_plugin_manager(entrypoints=False, extra=[("one", _Provider("tinynet"))])
    msg = plugins.registry.unknown_message("model", "tinynet2")
    assert msg == ("unknown model type 'tinynet2'; did you mean 'tinynet'? "
                   "Valid model types: tinynet (one)")
    assert plugins.registry.unknown_message("model", "fcos") == (
        "unknown model type 'fcos' Valid model types: tinynet (one); if a plugin you have not "
        "installed provides it, install it and list its distribution in task.requires")


def test_hook_hat_addhooks_lets_a_plugin_add_its_own_hookspecs() -> None:
    import pluggy

    specs = types.ModuleType("my_specs")
    marker = pluggy.HookspecMarker("hat")

    def build_widget(spec):  # type: ignore[no-untyped-def]
        """Build a widget."""

    specs.build_widget = marker(firstresult=True)(build_widget)  # type: ignore[attr-defined]

    class Owner:
        @hookimpl
        def hat_addhooks(self, pluginmanager):  # type: ignore[no-untyped-def]
            pluginmanager.add_hookspecs(specs)

    class ThirdParty:
        @hookimpl
        def build_widget(self, spec):  # type: ignore[no-untyped-def]
            return f"widget:{spec}"

    plugins = make_plugin_manager(entrypoints=False, extra=[("owner", Owner()), ("third", ThirdParty())])
    assert plugins.hook.build_widget(spec="x") == "widget:x"


def test_a_broken_plugin_is_reported_and_the_others_still_load(monkeypatch, capsys) -> None:
    broken = EntryPoint(name="broken", value="hat_no_such_module.plugin", group="hat")
    import hatcore.plugins as mod

    real = mod.entry_points
    monkeypatch.setattr(mod, "entry_points", lambda group: [*real(group=group), broken])
    plugins = make_plugin_manager(only={"toy", "broken"})
    assert "toy" in plugins.info
    assert plugins.failed["broken"].startswith("ModuleNotFoundError: No module named 'hat_no_such_module'")
    assert "plugin 'broken' (?) failed to load" in capsys.readouterr().err


def test_hat_load_plugins_allow_list(monkeypatch) -> None:
    monkeypatch.setenv("HAT_LOAD_PLUGINS", "")
    builtins = {"hatcore.builtin", "hatcore.callbacks"}
    assert set(make_plugin_manager().info) == builtins
    monkeypatch.setenv("HAT_LOAD_PLUGINS", "hat-toy")
    assert set(make_plugin_manager().info) == builtins | {"toy"}


def test_hat_trace_plugins_logs_hook_calls(monkeypatch, capsys) -> None:
    monkeypatch.setenv("HAT_TRACE_PLUGINS", "1")
    plugins = make_plugin_manager(only={"toy"})
    plugins.hook.hat_stages()
    assert "hat_stages" in capsys.readouterr().err


def test_plugins_command_lists_distributions_hooks_and_types(toy_plugins) -> None:
    from hatcore.cli import cli

    result = CliRunner().invoke(cli, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)["plugins"]}
    assert rows["toy"]["distribution"] == "hat-toy"
    assert "model:toy_detector" in rows["toy"]["types"]
    text = CliRunner().invoke(cli, ["plugins"]).output
    assert "toy  (hat-toy 0.0.1)" in text


def test_hook_register_commands_adds_a_command(toy_plugins) -> None:
    import click

    from hatcore.cli import cli

    class Adds:
        @hookimpl
        def register_commands(self, cli):  # type: ignore[no-untyped-def]
            @cli.command("hello-test")
            def hello() -> None:
                click.echo("hello from a plugin")

    toy_plugins.pm.register(Adds(), name="adds")
    toy_plugins.hook.register_commands(cli=cli)
    try:
        result = CliRunner().invoke(cli, ["hello-test"])
        assert result.output == "hello from a plugin\n"
    finally:
        cli.commands.pop("hello-test", None)
        set_plugins(None)


def test_the_installed_hat_plugins_list_the_three_distributions() -> None:
    plugins = make_plugin_manager(only={"hat-coco", "hat-fcos", "hat-bpu"})
    dists = {i.distribution for i in plugins.info.values()}
    assert {"hat-coco", "hat-fcos", "hat-bpu"} <= dists, (dists, plugins.failed)
    assert not plugins.failed


def test_hook_build_model_is_called_only_on_the_owner_of_the_type() -> None:
    """Dispatch by the registry: the plugin that registered `tiny` builds it; the others' build_model
    is not called at all (so no implementation has to re-check the spec's class)."""
    import torch

    called: list[str] = []

    class Owner(_Provider):
        @hookimpl
        def build_model(self, spec, plugins):  # type: ignore[no-untyped-def]
            called.append("owner")
            assert plugins.registry.get("model", "tiny").plugin == "owner"  # its own manager
            return torch.nn.Linear(spec.width, 2)

    class Bystander:
        @hookimpl
        def build_model(self, spec):  # type: ignore[no-untyped-def]
            called.append("bystander")
            return torch.nn.Identity()

    class Wrapper:  # cross-cutting (tracing, fault injection): still wraps the owner's call
        @hookimpl(wrapper=True)
        def build_model(self, spec):  # type: ignore[no-untyped-def]
            called.append("wrapper in")
            model = yield
            called.append(f"wrapper out {type(model).__name__}")
            return model

    plugins = make_plugin_manager(entrypoints=False, extra=[
        ("owner", Owner()), ("bystander", Bystander()), ("wrapper", Wrapper())])
    model = plugins.call_owner("build_model", "model", _TinySpec(type="tiny", width=3),
                               plugins=plugins)
    assert isinstance(model, torch.nn.Linear) and model.in_features == 3
    assert called == ["wrapper in", "owner", "wrapper out Linear"]
    from hatcore.errors import UserError

    with pytest.raises(UserError, match="unknown model type 'nope'"):
        plugins.call_owner("build_model", "model", _TinySpec(type="nope"), plugins=plugins)


def test_defaults_come_from_the_plugins_and_an_ambiguous_one_is_none() -> None:
    from hatcore.recipe import MetricSpec

    @spec
    class A(MetricSpec):
        pass

    class One:
        def __init__(self, name: str) -> None:
            self.name = name

        @hookimpl
        def hat_components(self, register):  # type: ignore[no-untyped-def]
            register("metric", self.name, A, default=True)

    single = make_plugin_manager(entrypoints=False, extra=[("a", One("a"))])
    assert single.registry.default("metric").name == "a"
    both = make_plugin_manager(entrypoints=False, extra=[("a", One("a")), ("b", One("b"))])
    assert both.registry.default("metric") is None
    assert both.registry.kind_hint("metric") == (
        "several plugins declare a default metric: a (tests.test_plugins), b (tests.test_plugins); "
        "name one with `type`")


def test_the_core_names_no_backend() -> None:
    """Defaults, file names and distributions come from the plugins: hatcore's code names none."""
    import re
    from pathlib import Path

    import hatcore

    banned = re.compile(r"horizon|\bhbir\b|\.hbir|\bhbm\b|\.hbm|bayes|bernoulli|hat[-_]bpu",
                        re.IGNORECASE)
    hits = [f"{p.name}:{i}: {line.strip()}" for p in Path(hatcore.__file__).parent.glob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if banned.search(line)]
    assert hits == []
