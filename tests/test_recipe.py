"""Recipes: strict structuring, error messages word for word, --set overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

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


def test_unknown_type_of_an_absent_known_plugin_names_the_distribution(tmp_path, toy_plugins) -> None:
    text = GOOD.replace('type = "toy_detector"', 'type = "fcos"')
    assert errors(tmp_path, text, toy_plugins.registry) == [
        "$.model.type: model type 'fcos' is provided by the hat-fcos plugin, which is not installed "
        "(pip install hat-fcos)"
    ]


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
