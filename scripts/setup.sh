#!/usr/bin/env bash
# Idempotent setup on a fresh machine: the Python venv (.venv) with the package and its test extras,
# and, with --elixir, Elixir/OTP and jiffy from Debian where missing. Sourced by serve.sh and test.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"

setup_python() {
    local extras="${1:-}"   # "" or an extra such as "test"
    if [ ! -x "$ROOT/.venv/bin/python" ]; then
        echo "==> creating $ROOT/.venv"
        "$PYTHON" -m venv "$ROOT/.venv"
    fi
    # Re-install only when pyproject.toml changed since the last successful install.
    local stamp="$ROOT/.venv/.snakepit-installed${extras:+-$extras}"
    if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
        echo "==> installing snakepit_bridge${extras:+[$extras]} into .venv"
        "$ROOT/.venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT${extras:+[$extras]}"
        touch "$stamp"
    fi
}

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

setup_elixir() {
    local need=()
    command -v mix >/dev/null 2>&1 || need+=(elixir)
    if ! erl -noshell -eval 'case code:which(jiffy) of non_existing -> halt(1); _ -> halt(0) end.' >/dev/null 2>&1; then
        need+=(erlang-jiffy)
    fi
    if [ "${#need[@]}" -gt 0 ]; then
        echo "==> installing ${need[*]} (apt-get)"
        as_root apt-get update -qq
        DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${need[@]}" >/dev/null
    fi
}
