#!/usr/bin/env bash
# Set up (first run only) and run the main job: the threaded worker server with the showcase adapter
# on 127.0.0.1. Extra arguments go to grpc_server_threaded.py, e.g. `bash scripts/serve.sh --port 0`.
# The venv gets grpcurl too (.venv/bin/grpcurl), for the README's commands.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
setup_python grpcurl
cd "$ROOT"
exec "$ROOT/.venv/bin/python" grpc_server_threaded.py --host 127.0.0.1 --port "${SNAKEPIT_PORT:-50052}" "$@"
