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

echo "==> Elixir tests"
cd "$ROOT/elixir_client"
mix test
