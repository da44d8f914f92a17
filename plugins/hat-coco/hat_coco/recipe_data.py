"""The one place hat-coco's data commands load a recipe's datasets (``hat data check|browse``).

The command hands in its run context (``hatcore.context.HatContext``, click's ``ctx.obj``);
the recipe is loaded through it, never through an import of the core's pipeline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hatcore.context import HatContext

SPLITS = ("train", "val")


def recipe_datasets(hat: HatContext, recipe: Path, overrides: tuple[str, ...] = (),
                    splits: tuple[str, ...] = SPLITS) -> dict[str, Any]:
    """The datasets (with their transforms) of the recipe's ``[data.SPLIT]`` tables; a split
    without a table is left out, a split that is not a data table at all is an error."""
    from hatcore.errors import UserError

    pipe = hat.load(recipe, overrides)
    for split in splits:
        if split not in SPLITS:
            raise UserError(f"--split {split!r}: a recipe has the data tables "
                            f"{', '.join(SPLITS)}")
    return {s: pipe.build_dataset(s) for s in splits if getattr(pipe.recipe.data, s) is not None}
