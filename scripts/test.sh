#!/usr/bin/env bash
# Set up everything on a fresh machine and run all tests: Python (pytest) and Elixir (mix test).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
setup_python test
setup_elixir
cd "$ROOT"
export PATH="$ROOT/.venv/bin:$PATH"   # grpcurl comes with the test extras
export SNAKEPIT_PYTHON="$ROOT/.venv/bin/python"

echo "==> Lint and types (ruff, mypy) of the package"
"$ROOT/.venv/bin/python" -m ruff check snakepit_bridge
"$ROOT/.venv/bin/python" -m mypy

echo "==> Python tests"
"$ROOT/.venv/bin/python" -m pytest -q "$@"

if [ "$#" -eq 0 ]; then
    # The servers of these run on the second transport (the free-threaded builds' one) as well.
    echo "==> Python server tests again, on the grpclib transport"
    SNAKEPIT_TEST_TRANSPORT=grpclib "$ROOT/.venv/bin/python" -m pytest -q -p no:cacheprovider \
        tests/test_server_tools.py tests/test_server_errors.py tests/test_server_values.py tests/test_server_batch.py \
        tests/test_server_sessions.py tests/test_server_health.py tests/test_server_grpcurl.py tests/test_server_auth.py \
        tests/test_server_lifecycle.py tests/test_server_concurrency.py tests/test_server_toolkit.py \
        tests/test_server_tracing.py tests/test_server_metrics.py tests/test_server_uds.py tests/test_server_shm.py \
        tests/test_server_rotation.py
fi

echo "==> Elixir tests"
cd "$ROOT/elixir_client"
mix test
