"""`snakepit_bridge.frozen` is `snakepit_bridge.toolkit.frozen`: the README's path.

The same module object, not a copy (`sys.modules` holds the one module under both names).
"""
import sys

from .toolkit import frozen as _module
from .toolkit.frozen import *  # noqa: F401,F403  (what editors and type checkers read)

sys.modules[__name__] = _module
