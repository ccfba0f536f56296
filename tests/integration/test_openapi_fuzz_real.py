"""The schema-driven fuzz (``tests/fuzz.py``) against a real ``keel serve`` process: the default guardrail policy
with its real classifiers, the real embedder and stores, and the session's real vLLM answering. The in-process fuzz
(``tests/unit/test_openapi_fuzz.py``) covers the document on scripted backends; this one checks that what the real
parts answer (a guard's refusal, vLLM's own errors, a streamed real answer) is what the document says too.

Generated chat and Responses requests that are valid go to the real model (their ``model`` set to the served alias)
with what they may generate capped, so a generated ``max_tokens`` of a million costs a few tokens on CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import schemathesis
import yaml
from schemathesis import GenerationMode

from app.security.keys import KeyStore
from tests.fuzz import fuzz
from tests.integration.conftest import ROOT, KeelServer, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLES = int(os.environ.get("KEEL_FUZZ_EXAMPLES_REAL", "2"))
MAX_NEW_TOKENS = 4
# what each generating operation calls its length limit
LIMITS = {"/v1/chat/completions": ("max_tokens", "max_completion_tokens"), "/v1/responses": ("max_output_tokens",)}


@pytest.fixture(scope="module")
def real_api(keel_server: KeelServer, tmp_path_factory: pytest.TempPathFactory):
    home: Path = tmp_path_factory.mktemp("fuzz-real")
    port = free_port()
    config = {
        "home": str(home), "server": {"port": port},
        "auth": {"default_rate_limit_per_minute": 1_000_000},
        # the session's vLLM: a URL means connect to it, not start one
        "backends": {"local": {"kind": "vllm", "base_url": f"{keel_server.vllm_url}/v1",
                               "api_key": keel_server.vllm_api_key, "read_timeout_s": 60}},
    }
    (home / "keel.yaml").write_text(yaml.safe_dump(config))
    store = KeyStore(home / "keel.db")
    admin = store.create("admin", ["admin"])[1]
    store.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEEL_")}
    env.update(KEEL_CONFIG=str(home / "keel.yaml"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    log = home / "keel.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve"], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    server = KeelServer(f"http://127.0.0.1:{port}", keel_server.vllm_url, home, proc, {"admin": admin}, log)
    try:
        server.wait_ready(300)
        yield server
    finally:
        server.stop()


def bounded(mode: GenerationMode):
    """Valid generating requests go to the served model and may generate at most ``MAX_NEW_TOKENS``."""
    def prepare(case: Any) -> None:
        limits = LIMITS.get(case.operation.path)
        if not limits or not isinstance(case.body, dict):
            return
        if mode is GenerationMode.POSITIVE:
            case.body["model"] = "smollm2"
            case.body[limits[0]] = min(_int(case.body.get(limits[0])) or MAX_NEW_TOKENS, MAX_NEW_TOKENS)
            case.body.pop("n", None)  # several choices multiply the cost; n itself is fuzzed in process
            if case.operation.path == "/v1/chat/completions" and not case.body.get("messages"):
                case.body["messages"] = [{"role": "user", "content": "Say hi."}]  # valid only with a prompt
        for name in limits:  # an invalid request may still be answered if its fault lies elsewhere
            if isinstance(case.body.get(name), int) and case.body[name] > MAX_NEW_TOKENS:
                case.body[name] = MAX_NEW_TOKENS
    return prepare


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_the_real_server_answers_as_its_document_says(real_api: KeelServer, mode: GenerationMode) -> None:
    schema = schemathesis.openapi.from_url(f"{real_api.url}/openapi.json")
    generated = real_api.vllm_metric("vllm:generation_tokens_total")
    failures = fuzz(schema, real_api.url, real_api.headers("admin"), mode, examples=EXAMPLES,
                    prepare=bounded(mode), timeout=120)
    assert not failures, f"{len(failures)} operations:\n" + "\n".join(failures) + \
        f"\nKeel's log (tail):\n{real_api.log.read_text()[-3000:]}"
    if mode is GenerationMode.POSITIVE:  # the valid requests reached the real model, not only Keel's checks
        assert real_api.vllm_metric("vllm:generation_tokens_total") > generated
