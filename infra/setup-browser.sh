#!/usr/bin/env bash
# Installs what the Prompt Studio browser test needs: Debian's headless-capable Chromium
# (Playwright's own browser download does not work offline) and the Python `playwright`
# package in the application virtual environment. Idempotent: re-running is cheap.
#
#   infra/setup-browser.sh            # uses ./.venv
#   VENV=/path/to/venv infra/setup-browser.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PLAYWRIGHT_VERSION="${PLAYWRIGHT_VERSION:-1.65.2}"

if [ -x /usr/bin/chromium ]; then
    echo "chromium: already installed ($(/usr/bin/chromium --version 2>/dev/null || echo unknown version))"
else
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        SUDO="sudo"
    fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update
    $SUDO apt-get install -y --no-install-recommends chromium fonts-dejavu-core
    echo "chromium: installed ($(/usr/bin/chromium --version 2>/dev/null || echo unknown version))"
fi

if [ -x "$VENV/bin/python" ]; then
    if "$VENV/bin/python" -c "import playwright" 2>/dev/null; then
        echo "playwright: already installed in $VENV"
    else
        # Only the Python package: never `playwright install` (it downloads a browser and fails
        # offline); the tests point Playwright at /usr/bin/chromium instead.
        "$VENV/bin/python" -m pip install "playwright==$PLAYWRIGHT_VERSION"
    fi
else
    echo "no virtual environment at $VENV: skipped the playwright package (set VENV=...)" >&2
fi
