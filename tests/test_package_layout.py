"""The package's rooms: one subpackage per product, arrows that only point down, and the old short
import paths (the guide's, the README's) still naming the very same modules."""
from __future__ import annotations

import ast
import importlib
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "snakepit_bridge"

# Which parts of the package each part may import. The contract knows nothing of the server, thread
# safety builds on the contract only, and the toolkit stands alone.
ALLOWED_IMPORTS = {
    "toolkit": {"toolkit"},
    "contract": {"contract", "toolkit"},
    "threadsafety": {"threadsafety", "contract", "toolkit"},
    "server": {"server", "contract", "threadsafety", "toolkit", "generated"},
    "adapters": {"adapters", "contract", "threadsafety", "toolkit"},
}

OLD_PATHS = {
    "snakepit_bridge.base_adapter_threaded": "snakepit_bridge.threadsafety.adapter",
    "snakepit_bridge.thread_safety_checker": "snakepit_bridge.threadsafety.checker",
    "snakepit_bridge.adapter": "snakepit_bridge.contract.adapter",
    "snakepit_bridge.rng": "snakepit_bridge.toolkit.rng",
    "snakepit_bridge.checkpoint": "snakepit_bridge.toolkit.checkpoint",
    "snakepit_bridge.ratelimit": "snakepit_bridge.toolkit.ratelimit",
    "snakepit_bridge.frozen": "snakepit_bridge.toolkit.frozen",
    "snakepit_bridge.batch": "snakepit_bridge.toolkit.batch",
    "snakepit_bridge.client": "snakepit_bridge.server.client",
    "snakepit_bridge.codec": "snakepit_bridge.server.codec",
}


def imported_parts(path: pathlib.Path) -> set[str]:
    """The top-level parts of snakepit_bridge that a module imports (relative or absolute)."""
    own = path.relative_to(PACKAGE).parts[:-1]
    parts: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(own[: len(own) - (node.level - 1)]) if node.level > 1 else list(own)
                target = base + (node.module.split(".") if node.module else [])
                if not target:  # `from .. import x` at the top: x is the part
                    target = [alias.name for alias in node.names][:1]
            elif node.module and node.module.startswith("snakepit_bridge."):
                target = node.module.split(".")[1:]
            else:
                continue
            parts.add(target[0])
    return parts


@pytest.mark.parametrize("part", sorted(ALLOWED_IMPORTS))
def test_each_subpackage_imports_only_the_parts_below_it(part):
    for module in sorted((PACKAGE / part).rglob("*.py")):
        wrong = imported_parts(module) - ALLOWED_IMPORTS[part]
        assert not wrong, f"{module.relative_to(PACKAGE)} imports {sorted(wrong)}"


@pytest.mark.parametrize("old, new", sorted(OLD_PATHS.items()))
def test_old_import_paths_are_the_same_module_objects(old, new):
    assert importlib.import_module(old) is importlib.import_module(new)


def test_the_guides_imports_work_in_a_fresh_interpreter():
    code = ("from snakepit_bridge.base_adapter_threaded import ThreadSafeAdapter, thread_safe_method, tool\n"
            "from snakepit_bridge.thread_safety_checker import ThreadSafetyChecker\n"
            "from snakepit_bridge.adapters.threaded_showcase import ThreadedShowcaseAdapter\n"
            "import snakepit_bridge.thread_safety_checker as tsc\n"
            "assert tsc.ThreadSafetyChecker is ThreadSafetyChecker and callable(tsc.get_active_checker)\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_python_client_does_not_load_the_server():
    code = ("import sys, snakepit_bridge.client\n"
            "loaded = sorted(m for m in sys.modules if m.startswith('snakepit_bridge.server.'))\n"
            "assert loaded == ['snakepit_bridge.server.client', 'snakepit_bridge.server.codec', "
            "'snakepit_bridge.server.shm', 'snakepit_bridge.server.wire'], loaded\n")  # what both ends share
    subprocess.run([sys.executable, "-c", code], check=True)
