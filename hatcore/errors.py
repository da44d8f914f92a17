"""Errors the command line turns into exit codes.

``UserError`` is a mistake the user can fix (recipe, arguments, a missing file): the CLI prints its
message as one paragraph and exits 2, without a traceback. Anything else exits 1.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix. ``str(err)`` is the whole message shown to them."""


class RecipeError(UserError):
    """A recipe that does not validate. ``errors`` lists every problem, one per line."""

    def __init__(self, source: str, errors: list[str]) -> None:
        self.source = source
        self.errors = errors
        lines = "\n".join(f"  {e}" for e in errors)
        noun = "error" if len(errors) == 1 else "errors"
        super().__init__(f"{source}: {len(errors)} {noun} in recipe:\n{lines}")
