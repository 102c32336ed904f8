"""`snakepit_bridge.ratelimit` is `snakepit_bridge.toolkit.ratelimit`: the README's path.

The same module object, not a copy (`sys.modules` holds the one module under both names).
"""
import sys

from .toolkit import ratelimit as _module
from .toolkit.ratelimit import *  # noqa: F401,F403  (what editors and type checkers read)

sys.modules[__name__] = _module
