"""A Qdrant server for the vector-store contract suite, where one is at hand: ``KEEL_TEST_QDRANT_URL`` (e.g.
``http://localhost:6333`` of ``docker run -p 6333:6333 qdrant/qdrant``) adds a ``qdrant-server`` case to every
contract test. No Qdrant server installs from the package registries, so without the variable the suite runs on
the embedded engine and qdrant-client's local mode only. The suite drops and recreates the collections it uses
(``docs``, ``kb``) and leaves any other alone; a throwaway server is still the one to point it at."""

from __future__ import annotations

import os

# Read at import: tests/conftest.py removes every KEEL_* variable right after importing this module.
QDRANT_URL = os.environ.get("KEEL_TEST_QDRANT_URL") or None
