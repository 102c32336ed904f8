"""`snakepit_bridge.client` is `snakepit_bridge.server.client`: the Python client's short path.

The same module object, not a copy (`sys.modules` holds the one module under both names).
"""
import sys

from .server import client as _module
from .server.client import *  # noqa: F401,F403  (what editors and type checkers read)

sys.modules[__name__] = _module
