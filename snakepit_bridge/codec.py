"""`snakepit_bridge.codec` is `snakepit_bridge.server.codec`: the wire encoding's short path.

The same module object, not a copy (`sys.modules` holds the one module under both names).
"""
import sys

from .server import codec as _module
from .server.codec import *  # noqa: F401,F403  (what editors and type checkers read)

sys.modules[__name__] = _module
