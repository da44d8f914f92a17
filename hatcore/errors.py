"""Errors the command line turns into exit codes.

``UserError`` is a mistake the user can fix (recipe, arguments, a missing file): the CLI prints its
message as one paragraph and exits 2, without a traceback. Anything else exits 1.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix. ``str(err)`` is the whole message shown to them.

    Raised in a DataLoader worker, it reaches the main process re-made from the worker's
    traceback text; ``str`` gives back the original message alone (no traceback for the user).
    """

    def __str__(self) -> str:
        text = super().__str__()
        marker = f"{type(self).__module__}.{type(self).__qualname__}: "
        if text.startswith("Caught ") and "\nOriginal Traceback" in text and marker in text:
            where = text.split("\n", 1)[0].removeprefix(f"Caught {type(self).__name__} ").rstrip(".")
            return f"{text.rsplit(marker, 1)[1].strip()} ({where})"
        return text


class RecipeError(UserError):
    """A recipe that does not validate. ``errors`` lists every problem, one per line."""

    def __init__(self, source: str, errors: list[str]) -> None:
        self.source = source
        self.errors = errors
        lines = "\n".join(f"  {e}" for e in errors)
        noun = "error" if len(errors) == 1 else "errors"
        super().__init__(f"{source}: {len(errors)} {noun} in recipe:\n{lines}")
