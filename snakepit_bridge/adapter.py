"""`snakepit_bridge.adapter` is `snakepit_bridge.contract.adapter`: the adapter contract.

The same module object, not a copy (`sys.modules` holds the one module under both names).
"""
import sys

from .contract import adapter as _module
from .contract.adapter import *  # noqa: F401,F403  (what editors and type checkers read)

sys.modules[__name__] = _module
