#!/usr/bin/env bash
# The free-threaded test subset: builds (or reuses) a free-threaded CPython 3.13 and its venv
# (scripts/freethreaded-python.sh; ~15 minutes the first time on 2 cores), then runs, with every test
# server on that interpreter (GIL off, grpclib transport): the free-threading checks, the server's
# tools, errors, values, batches and concurrency, the thread-safety corpus and the guide's examples,
# and the Elixir client's API, concurrency and stream suites against such workers.
# The test process itself stays on .venv (it calls the servers with grpcio).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
setup_python test
setup_elixir
started=$(date +%s)
FT_PYTHON="$(bash "$ROOT/scripts/freethreaded-python.sh" | tail -n 1)"
echo "==> free-threaded interpreter ready in $(( $(date +%s) - started )) s: $FT_PYTHON"
cd "$ROOT"
export PATH="$ROOT/.venv/bin:$PATH" SNAKEPIT_PYTHON="$ROOT/.venv/bin/python" SNAKEPIT_TEST_SERVER_PYTHON="$FT_PYTHON"
"$ROOT/.venv/bin/python" -m pytest -q -p no:cacheprovider "$@" \
    tests/test_free_threading.py tests/test_server_tools.py tests/test_server_errors.py tests/test_server_values.py \
    tests/test_server_batch.py tests/test_server_concurrency.py tests/test_server_health.py tests/test_server_grpcurl.py \
    tests/test_thread_safety_checker.py tests/test_thread_safety_gen2.py tests/test_guide_examples.py tests/test_server_shm.py
echo "==> the Elixir client against workers on the free-threaded build"
(cd "$ROOT/elixir_client" && SNAKEPIT_PYTHON="$FT_PYTHON" mix test test/snakepit_api_test.exs test/pool_concurrency_test.exs \
    test/stream_backpressure_test.exs)
echo "==> free-threaded subset done in $(( $(date +%s) - started )) s"
