"""`snakepit_bridge.base_adapter_threaded` is `snakepit_bridge.threadsafety.adapter`: the guide's path.

The same module object, not a copy (`sys.modules` holds the one module under both names).
"""
import sys

from .threadsafety import adapter as _module
from .threadsafety.adapter import *  # noqa: F401,F403  (what editors and type checkers read)

sys.modules[__name__] = _module
