#!/usr/bin/env bash
# Installs the real document sets the retrieval-quality tests and bench/retrieval_quality.py run on, from
# Debian's packages: python3.11-doc (the CPython 3.11 library reference and FAQ as Sphinx HTML, with their
# navigation, sidebars and code samples) and debian-faq (the Debian FAQ as DocBook HTML).
# Idempotent. Elsewhere, point KEEL_PYDOCS_DIR at an equivalent html/library folder instead.
set -euo pipefail

missing=()
[ -f /usr/share/doc/python3.11/html/library/json.html ] || missing+=(python3.11-doc)
[ -f /usr/share/doc/debian/FAQ/pkgtools.en.html ] || missing+=(debian-faq)
if [ ${#missing[@]} -eq 0 ]; then
    echo "python3.11-doc, debian-faq: already installed"
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends "${missing[@]}"
echo "${missing[*]}: installed"
