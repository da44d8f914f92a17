"""``python -m hatcore.scaffold docs/plugins.md [--check]``: the guide's scaffold blocks."""

import sys

from hatcore.scaffold import main

sys.exit(main(sys.argv[1:]))
