"""Facts about the running interpreter that the server, the stats and the checker report."""
from __future__ import annotations

import sys
import sysconfig


def gil_enabled() -> bool:
    """False only on a free-threaded interpreter that is running without the GIL."""
    probe = getattr(sys, "_is_gil_enabled", None)
    return True if probe is None else bool(probe())


def free_threaded_build() -> bool:
    """True on a free-threaded (3.13t/3.14t) build, whether or not the GIL was re-enabled."""
    return bool(sysconfig.get_config_var("Py_GIL_DISABLED"))
