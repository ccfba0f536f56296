#!/usr/bin/env bash
# Installs the real document set the retrieval-quality test runs on: Debian's python3.11-doc
# (the CPython 3.11 library reference as Sphinx HTML, with its navigation, sidebars and code samples).
# Idempotent. Elsewhere, point KEEL_PYDOCS_DIR at an equivalent html/library folder instead.
set -euo pipefail

DOCS=/usr/share/doc/python3.11/html/library
if [ -f "$DOCS/json.html" ]; then
    echo "python3.11-doc: already installed"
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends python3.11-doc
echo "python3.11-doc: installed"
