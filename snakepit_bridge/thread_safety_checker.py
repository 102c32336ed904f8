"""`snakepit_bridge.thread_safety_checker` is `snakepit_bridge.threadsafety.checker`, the checker's facade
(a package): the guide's path.

The same module object, not a copy (`sys.modules` holds the one module under both names).
"""
import sys

from .threadsafety import checker as _module
from .threadsafety.checker import *  # noqa: F401,F403  (what editors and type checkers read)

sys.modules[__name__] = _module
