#!/usr/bin/env bash
# One entry point for a fresh machine (Debian/Ubuntu, Python >= 3.10):
#   bash scripts/setup.sh demo   # install, then run the main job on the bundled sample
#   bash scripts/setup.sh test   # install, then run the whole test suite headlessly
# Idempotent: the venv and packages are installed once (re-installed only when
# pyproject.toml or constraints.txt change); Debian packages only when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

what="${1:-}"
shift || true
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"

# --- Python packages (CPU torch pinned by constraints.txt: never a CUDA download) ----
key=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
stamp="$VENV/.napari-medinst-$key"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
if [ ! -f "$stamp" ]; then
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -c constraints.txt -e ".[pyqt6,testing]"
    rm -f "$VENV"/.napari-medinst-*
    touch "$stamp"
fi

# --- Debian packages for a virtual display (Xvfb + Mesa GL + Qt's xcb deps) ---------
DEBS="xvfb xauth libgl1 libegl1 libgl1-mesa-dri libglx-mesa0 libxkbcommon-x11-0 \
libxcb-icccm4 libxcb-keysyms1 libxcb-cursor0 libxcb-xinerama0 libfontconfig1 libdbus-1-3"
missing=""
if command -v dpkg-query >/dev/null 2>&1; then
    for p in $DEBS; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
    done
fi
if [ -n "$missing" ]; then
    echo "installing Debian packages for a virtual display:$missing"
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

case "$what" in
    demo)
        if [ -n "${DISPLAY:-}" ] && [ -z "${CI:-}" ]; then
            exec "$VENV/bin/napari-medinst" demo --gui open "$@"
        fi
        exec xvfb-run -a -s "-screen 0 1920x1080x24" "$VENV/bin/napari-medinst" demo --gui screenshot "$@"
        ;;
    test)
        exec "$VENV/bin/python" -m pytest "$@"
        ;;
    *)
        echo "usage: bash scripts/setup.sh demo|test [extra arguments]" >&2
        exit 2
        ;;
esac
