"""hat-bpu's own hooks: plugin observers and marches found through the run's plugin manager,
duplicates and shadowed names refused by name, unknown names answered with the known ones."""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch
from hat_bpu import plugin as bpu
from hat_bpu.device.march import MARCHES, get_march, march_names
from hat_bpu.quant import observers
from hat_bpu.quant.observers import Observer

from hatcore import hookimpl
from hatcore.errors import UserError
from hatcore.plugins import make_plugin_manager, set_plugins


def _plugin(name: str, **hooks: object) -> types.ModuleType:
    mod = types.ModuleType(name)
    for key, fn in hooks.items():
        setattr(mod, key, hookimpl(fn))  # type: ignore[call-overload]
    return mod


@pytest.fixture
def run_with():  # type: ignore[no-untyped-def]
    """Install a fresh manager with hat-bpu and the given plugins as the run's."""
    def install(*plugins: types.ModuleType) -> None:
        set_plugins(make_plugin_manager(entrypoints=False, extra=[
            ("bpu", bpu), *((p.__name__, p) for p in plugins)]))
    try:
        yield install
    finally:
        set_plugins(None)


def _half(name: str):  # type: ignore[no-untyped-def]
    return dataclasses.replace(get_march("bayes-e"), name=name, peak_tops_int8=5.0)


def test_a_plugin_march_is_found_and_listed(run_with) -> None:
    run_with(_plugin("chips", bpu_marches=lambda: [_half("half-e")]))
    assert march_names() == (*MARCHES, "half-e")
    assert get_march("half-e").peak_tops_int8 == 5.0
    assert get_march("bayes-e").peak_tops_int8 == 10.0
    with pytest.raises(UserError, match=r"unknown march 'nope'; expected one of bernoulli, "
                                        r"bernoulli2, bayes, bayes-e, half-e \(plugin chips\)"):
        get_march("nope")


def test_march_duplicates_shadowing_and_bad_records_are_refused(run_with) -> None:
    run_with(_plugin("a", bpu_marches=lambda: [_half("x")]),
             _plugin("b", bpu_marches=lambda: [_half("x")]))
    with pytest.raises(UserError, match="march 'x' is added by two plugins: 'a' and 'b'"):
        get_march("x")
    run_with(_plugin("a", bpu_marches=lambda: [_half("bayes-e")]))
    with pytest.raises(UserError, match="plugin 'a' adds march 'bayes-e', which hat-bpu already"):
        march_names()
    run_with(_plugin("a", bpu_marches=lambda: [{"name": "dict"}]))
    with pytest.raises(UserError, match="plugin 'a': bpu_marches returned .* not a "):
        get_march("dict")


def _half_max(*, hist, hist_max, max_abs, dtype, pow2):  # type: ignore[no-untyped-def]
    return max_abs / 2


def test_a_plugin_observer_sets_the_range(run_with) -> None:
    run_with(_plugin("ranges", bpu_observers=lambda: {"half_max": _half_max}))
    observers.resolve("half_max")
    obs = Observer("half_max", "int8")
    obs(torch.tensor([0.5, -3.0, 1.0]))
    assert float(obs.amax()) == 1.5  # the plugin's rule on what was observed
    with pytest.raises(UserError, match=r"observer = 'nope': unknown observer; expected one of "
                                        r"minmax, ma_minmax, percentile, mse, kl, auto, "
                                        r"half_max \(plugin ranges\)"):
        observers.resolve("nope")


def test_the_recipe_names_a_plugin_observer(run_with) -> None:
    run_with(_plugin("ranges", bpu_observers=lambda: {"half_max": _half_max}))
    assert bpu.qconfig_from_spec(bpu.HorizonQuantizeSpec(type="horizon", observer="half_max")).observer == (
        "half_max")
    with pytest.raises(UserError, match="unknown observer"):
        bpu.qconfig_from_spec(bpu.HorizonQuantizeSpec(type="horizon", observer="half-max"))


def test_without_plugins_only_the_builtins(run_with) -> None:
    run_with()
    assert march_names() == MARCHES
    with pytest.raises(UserError, match=r"expected one of minmax, ma_minmax, percentile, mse, "
                                        r"kl, auto$"):
        observers.resolve("half_max")
    with pytest.raises(ValueError, match="unknown observer 'half_max'"):
        Observer("half_max")  # the last run's plugin rules are gone
