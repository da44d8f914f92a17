"""Recipes: strict structuring, error messages word for word, --set overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from hatcore import hookimpl
from hatcore.errors import RecipeError
from hatcore.recipe import load_recipe, parse_override, resolved

GOOD = """
[task]
name = "toy"
work_dir = "runs/toy"

[model]
type = "toy_detector"
num_classes = 2

[data.train]
type = "toy_squares"
batch_size = 4
transforms = [{ type = "toy_flip", p = 0.5 }]

[data.val]
type = "toy_squares"

[metric]
type = "toy_hits"

[stages.float]
epochs = 2
optimizer = { type = "sgd", lr = 0.1, nesterov = true }
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "recipe.toml"
    p.write_text(text)
    return p


def errors(tmp_path: Path, text: str, registry, overrides=()) -> list[str]:  # type: ignore[no-untyped-def]
    with pytest.raises(RecipeError) as err:
        load_recipe(write(tmp_path, text), registry, overrides)
    return err.value.errors


def test_a_good_recipe_structures_into_typed_classes(tmp_path, toy_plugins) -> None:
    recipe, _ = load_recipe(write(tmp_path, GOOD), toy_plugins.registry)
    assert recipe.model.num_classes == 2
    assert recipe.data.train.transforms[0].p == 0.5
    assert recipe.stages.float.optimizer.nesterov is True
    assert recipe.stages.qat.epochs == 1  # defaults filled
    data = resolved(recipe, toy_plugins.registry)
    assert data["model"] == {"type": "toy_detector", "num_classes": 2, "width": 8}
    assert data["data"]["train"]["transforms"] == [{"type": "toy_flip", "p": 0.5}]


def test_misspelt_key_names_the_path_and_suggests(tmp_path, toy_plugins) -> None:
    text = GOOD.replace("epochs = 2", "epoch = 2")
    assert errors(tmp_path, text, toy_plugins.registry) == [
        "$.stages.float.epoch: unknown key 'epoch'; did you mean 'epochs'?"
    ]


def test_all_errors_are_reported_at_once(tmp_path, toy_plugins) -> None:
    text = (GOOD.replace("num_classes = 2", "num_classes = 2.5")
                .replace('type = "toy_flip"', 'type = "toy_flp"')
                .replace("batch_size = 4", 'batch_size = "4"')
                .replace('type = "sgd"', 'type = "sdg"'))
    assert sorted(errors(tmp_path, text, toy_plugins.registry)) == sorted([
        "$.model.num_classes: expected an integer, got 2.5",
        "$.data.train.batch_size: expected an integer, got '4'",
        "$.data.train.transforms[0].type: unknown transform type 'toy_flp'; did you mean 'toy_flip'? "
        "Valid transform types: toy_flip (toy)",
        "$.stages.float.optimizer.type: must be one of 'sgd', 'adamw', got 'sdg'; did you mean 'sgd'?",
    ])


def test_unknown_type_names_the_valid_ones_and_task_requires(tmp_path, toy_plugins) -> None:
    text = GOOD.replace('type = "toy_detector"', 'type = "fcos"')
    assert errors(tmp_path, text, toy_plugins.registry) == [
        "$.model.type: unknown model type 'fcos' Valid model types: toy_detector (toy); if a "
        "plugin you have not installed provides it, install it and list its distribution in "
        "task.requires"
    ]


def test_task_requires_names_the_missing_distribution_first(tmp_path, toy_plugins) -> None:
    text = GOOD.replace('type = "toy_detector"', 'type = "fcos"').replace(
        'work_dir = "runs/toy"', 'work_dir = "runs/toy"\nrequires = ["hat-toy", "hat-no-such-plugin"]')
    # the recipe's own list (pytest's required_plugins), checked before the type names
    assert errors(tmp_path, text, toy_plugins.registry) == [
        "$.task.requires[1]: the recipe needs the hat-no-such-plugin plugin, which is not "
        "installed (pip install 'hat-no-such-plugin')"
    ]
    text = GOOD.replace('work_dir = "runs/toy"', 'work_dir = "runs/toy"\nrequires = ["hat-toy>=9"]')
    assert errors(tmp_path, text, toy_plugins.registry) == [
        "$.task.requires[0]: the recipe needs hat-toy>=9, installed is hat-toy 0.0.1 "
        "(pip install 'hat-toy>=9')"
    ]
    pytest.importorskip("hat_coco")
    text = GOOD.replace('work_dir = "runs/toy"', 'work_dir = "runs/toy"\nrequires = ["hat-coco"]')
    assert errors(tmp_path, text, toy_plugins.registry) == [  # installed, not in this manager
        "$.task.requires[0]: hat-coco is installed but not loaded (left out by HAT_LOAD_PLUGINS, "
        "or it failed to load: `hat plugins`)"
    ]
    ok = GOOD.replace('work_dir = "runs/toy"', 'work_dir = "runs/toy"\nrequires = ["hat-toy>=0.0.1"]')
    recipe, _ = load_recipe(write(tmp_path, ok), toy_plugins.registry)
    assert recipe.task.requires == ["hat-toy>=0.0.1"]


def test_sections_take_the_installed_default_eagerly(tmp_path) -> None:
    from hatcore.plugins import make_plugin_manager
    from hatcore.recipe import MetricSpec, spec

    @spec
    class Scores(MetricSpec):
        pass

    class Provider:
        @hookimpl
        def hat_components(self, register):  # type: ignore[no-untyped-def]
            register("metric", "scores", Scores, "a default metric", default=True)

    plugins = make_plugin_manager(only={"toy"}, extra=[("provider", Provider())])
    recipe, _ = load_recipe(write(tmp_path, GOOD.replace('[metric]\ntype = "toy_hits"\n', "")),
                            plugins.registry)
    assert type(recipe.metric) is Scores  # not None, resolved on use: structured at load
    assert resolved(recipe, plugins.registry)["metric"] == {"type": "scores"}


def test_a_stage_whose_plugin_is_missing_is_reported_before_anything_runs(tmp_path,
                                                                          toy_plugins) -> None:
    from hatcore.pipeline import Pipeline

    work = tmp_path / "work"
    path = write(tmp_path, GOOD.replace('"runs/toy"', f'"{work}"'))
    pipe = Pipeline.load(path, plugins=toy_plugins)  # loads: `hat predict` needs no quantizer
    with pytest.raises(RecipeError) as err:
        pipe.run()  # calibration/qat on, no quantizer installed
    assert err.value.errors[0] == (
        "$.quantize: the calibration stage needs a quantizer, the recipe names none and no "
        "installed plugin provides a default one (no installed plugin provides any quantizer "
        "type); install the plugin (and list its distribution in task.requires) or disable the "
        "stage")
    assert not work.exists()  # before float training, before anything is written
    off = ["stages.calibration.enabled=false", "stages.qat.enabled=false"]
    pipe = Pipeline.load(path, off, plugins=toy_plugins)
    assert [s.name for s in pipe.table if s.enabled(pipe.recipe)] == ["float", "toy_round"]
    pipe.check_sections()  # nothing missing for the stages left
    Pipeline.load(path, plugins=toy_plugins).check_sections(["float"])  # `--stage float` alone


def test_missing_required_key_and_wrong_table(tmp_path, toy_plugins) -> None:
    text = GOOD.replace('work_dir = "runs/toy"', "").replace("[data.val]", "[data.val]\nshuffle = 3")
    assert sorted(errors(tmp_path, text, toy_plugins.registry)) == [
        "$.data.val.shuffle: expected true or false, got 3",
        "$.task.work_dir: required key missing",
    ]


def test_bad_toml_and_missing_file(tmp_path, toy_plugins) -> None:
    assert errors(tmp_path, "[task\nname=1", toy_plugins.registry)[0].startswith("not valid TOML:")
    with pytest.raises(RecipeError) as err:
        load_recipe(tmp_path / "nope.toml", toy_plugins.registry)
    assert err.value.errors == ["cannot read the recipe: No such file or directory"]


def test_set_overrides_take_toml_values(tmp_path, toy_plugins) -> None:
    recipe, raw = load_recipe(write(tmp_path, GOOD), toy_plugins.registry, [
        "stages.float.epochs=5", "task.work_dir=runs/other", "data.train.transforms.0.p=0.25",
        "stages.qat.optimizer.betas=[0.8, 0.9]", "stages.float.ema=true",
    ])
    assert recipe.stages.float.epochs == 5
    assert recipe.task.work_dir == "runs/other"
    assert recipe.data.train.transforms[0].p == 0.25
    assert recipe.stages.qat.optimizer.betas == [0.8, 0.9]
    assert recipe.stages.float.ema is True
    assert parse_override("a.b='x'") == (["a", "b"], "x")


def test_set_errors_name_the_key(tmp_path, toy_plugins) -> None:
    assert errors(tmp_path, GOOD, toy_plugins.registry, ["stages.float.epochz=3"]) == [
        "$.stages.float.epochz: unknown key 'epochz'; did you mean 'epochs'?"
    ]
    assert errors(tmp_path, GOOD, toy_plugins.registry, ["novalue"]) == [
        "'novalue': expected KEY=VALUE, e.g. stages.float.epochs=2"
    ]
