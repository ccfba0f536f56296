"""Shared fixtures. Offline settings first: nothing in the tests may reach a model hub."""

from __future__ import annotations

import os

# Real Postgres (pgserver, or KEEL_TEST_POSTGRES_URL) for the Postgres-backed stores. Imported before the
# KEEL_* variables are cleared below: the module reads KEEL_TEST_POSTGRES_URL when it is imported.
from tests.postgres import postgres_server, postgres_url  # noqa: F401
from tests.qdrant import QDRANT_URL  # noqa: F401  (KEEL_TEST_QDRANT_URL, read before the clearing below)

for _k, _v in {
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
    "RAGAS_DO_NOT_TRACK": "true", "LITELLM_LOCAL_MODEL_COST_MAP": "True",
}.items():
    os.environ.setdefault(_k, _v)
# Tests must not pick up a developer's keel.yaml or KEEL_* variables by accident.
for _k in [k for k in os.environ if k.startswith("KEEL_")]:
    del os.environ[_k]
