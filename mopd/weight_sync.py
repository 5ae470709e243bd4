"""The name DESIGN.md §2 gives the weight sync; the code lives in ``mopd.sync``."""

from mopd.sync import *  # noqa: F403
from mopd.sync import __all__  # noqa: F401
