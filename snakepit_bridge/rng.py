"""`snakepit_bridge.rng` is `snakepit_bridge.toolkit.rng`: the README's path.

The same module object, not a copy (`sys.modules` holds the one module under both names).
"""
import sys

from .toolkit import rng as _module
from .toolkit.rng import *  # noqa: F401,F403  (what editors and type checkers read)

sys.modules[__name__] = _module
