#!/usr/bin/env bash
# A free-threaded CPython 3.13 (built with --disable-gil) and a venv with this project in it.
#
#   bash scripts/freethreaded-python.sh      # last line of output: the venv's python
#
# The interpreter is built once from Debian's own source package `python3.13` (trixie), fetched
# through the Debian mirror this machine's apt sources already name, checked against the sha256 in
# that release's Sources index, and kept in a cache outside the repository
# ($SNAKEPIT_FT_CACHE, default ~/.cache/snakepit-freethreaded): about 15 minutes on 2 cores the first
# time, seconds after. pip comes from PyPI (its wheel, run as a zip), then `-m venv` makes
# $SNAKEPIT_FT_VENV (default .venv-ft in the repository) with the project and the free-threaded
# transport's dependencies (requirements/freethreaded.txt; grpcio has no free-threaded wheel).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${SNAKEPIT_FT_CACHE:-$HOME/.cache/snakepit-freethreaded}"
VENV="${SNAKEPIT_FT_VENV:-$ROOT/.venv-ft}"
RELEASE="${SNAKEPIT_FT_DEBIAN_RELEASE:-trixie}"
PREFIX="$CACHE/python3.13t"
PY="$PREFIX/bin/python3.13t"
log() { echo "==> $*" >&2; }

debian_mirror() {
    # The first Debian archive (not the security one) the apt sources name, deb822 or one-line style.
    local uri
    uri="$( (grep -h '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{for (i = 2; i <= NF; i++) print $i}';
             grep -h '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | awk '{print $2}') \
            | grep -v -- '-security' | grep -E '/debian/?$' | head -n 1)"
    [ -n "$uri" ] || { echo "error: no Debian mirror in the apt sources" >&2; exit 1; }
    echo "${uri%/}"
}

is_free_threaded() {
    [ -x "$1" ] && "$1" -c 'import sys, sysconfig; sys.exit(0 if sysconfig.get_config_var("Py_GIL_DISABLED") else 1)'
}

build_interpreter() {
    local mirror work sources entry directory tarball sha
    mirror="$(debian_mirror)"
    work="$CACHE/build"
    rm -rf "$work" && mkdir -p "$work"
    log "reading $RELEASE's source index from $mirror"
    curl -fsS "$mirror/dists/$RELEASE/main/source/Sources.xz" | xz -dc > "$work/Sources"
    entry="$(awk '/^Package: python3.13$/ {found = 1} found && /^$/ {exit} found' "$work/Sources")"
    directory="$(awk '/^Directory:/ {print $2}' <<<"$entry")"
    read -r sha _ tarball < <(awk '/^Checksums-Sha256:/ {grab = 1; next} grab && /^ / {print $1, $2, $3} grab && !/^ / {grab = 0}' \
                                  <<<"$entry" | grep 'orig\.tar\.xz$')
    [ -n "$directory" ] && [ -n "$tarball" ] || { echo "error: python3.13 not found in $RELEASE's Sources" >&2; exit 1; }
    log "downloading $tarball"
    curl -fsS -o "$work/$tarball" "$mirror/$directory/$tarball"
    echo "$sha  $work/$tarball" | sha256sum -c --quiet -
    tar -C "$work" -xf "$work/$tarball"
    local source
    source="$(find "$work" -maxdepth 1 -type d -name 'Python-*' | head -n 1)"
    log "building a free-threaded CPython from $source (--disable-gil; about 15 minutes on 2 cores)"
    (cd "$source" && ./configure --quiet --disable-gil --without-ensurepip --prefix="$PREFIX" >"$work/configure.log" 2>&1 \
        && make -j"$(nproc)" >"$work/make.log" 2>&1 && make install >"$work/install.log" 2>&1) \
        || { echo "error: the build failed; see $work/*.log" >&2; tail -n 30 "$work"/*.log >&2; exit 1; }
    rm -rf "$source" "$work/$tarball"
}

install_pip() {
    "$PY" -m pip --version >/dev/null 2>&1 && return
    local wheels="$CACHE/wheels"
    mkdir -p "$wheels"
    log "installing pip from its PyPI wheel"
    python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: -d "$wheels" pip
    local wheel
    wheel="$(ls "$wheels"/pip-*.whl | tail -n 1)"
    "$PY" "$wheel/pip" install --quiet --disable-pip-version-check "$wheel"
}

make_venv() {
    local stamp="$VENV/.snakepit-installed"
    if [ ! -x "$VENV/bin/python" ]; then
        log "creating $VENV"
        "$PY" -m venv "$VENV"
    fi
    if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ] || [ "$ROOT/requirements/freethreaded.txt" -nt "$stamp" ]; then
        log "installing snakepit_bridge and requirements/freethreaded.txt into $VENV"
        # --prefer-binary: a newer release without a free-threaded wheel would be built from source
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --prefer-binary \
            -r "$ROOT/requirements/freethreaded.txt"
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -e "$ROOT"
        touch "$stamp"
    fi
}

if ! is_free_threaded "$PY"; then
    build_interpreter
fi
is_free_threaded "$PY" || { echo "error: $PY is not a free-threaded build" >&2; exit 1; }
install_pip
make_venv
"$VENV/bin/python" -c 'import sys; assert not sys._is_gil_enabled(), "the GIL is on"' >&2
echo "$VENV/bin/python"
