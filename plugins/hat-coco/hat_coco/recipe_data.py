"""The one place hat-coco's data commands load a recipe's datasets (``hat data check|browse``).

Kept in one small function so the way a plugin command receives the run (today: loading the
recipe through hatcore's Pipeline) changes in one place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hatcore.errors import UserError

SPLITS = ("train", "val")


def recipe_datasets(recipe: Path, overrides: tuple[str, ...] = (),
                    splits: tuple[str, ...] = SPLITS) -> dict[str, Any]:
    """The datasets (with their transforms) of the recipe's ``[data.SPLIT]`` tables; a split
    without a table is left out, a split that is not a data table at all is an error."""
    from hatcore.pipeline import Pipeline

    if not recipe.is_file():
        raise UserError(f"{recipe}: no such recipe file")
    pipe = Pipeline.load(recipe, overrides)
    for split in splits:
        if split not in SPLITS:
            raise UserError(f"--split {split!r}: a recipe has the data tables "
                            f"{', '.join(SPLITS)}")
    return {s: pipe.build_dataset(s) for s in splits if getattr(pipe.recipe.data, s) is not None}
