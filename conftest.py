"""Repository-wide pytest settings.

Under CI (``CI`` set, as `.ci/run` runs) hypothesis draws the same examples every run, so a
submission's result does not depend on luck; locally it keeps drawing new ones (and keeps its
example database), which is how it finds new failing cases.
"""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")
