"""``python -m hatcore`` = ``hat`` (torchrun launches it this way)."""

from hatcore.cli import main

main()
