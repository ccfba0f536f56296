"""A batch end to end: the real ``keel serve`` process, the real vLLM server and SmolLM2, the real guardrails,
traces and lineage, driven by the unchanged ``openai`` client: ``KEEL_BATCH_E2E_REQUESTS`` requests (default 31,
sampled for CI's time; 100 was measured at 111 s) with 3 bad lines."""

from __future__ import annotations

import json
import os
import time

import httpx
import openai
import pytest

from tests.integration.conftest import KeelServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N = max(31, int(os.environ.get("KEEL_BATCH_E2E_REQUESTS", "31")))  # lines 10, 20 and 30 are the bad ones
QUESTIONS = ["What is the capital of France?", "Name a primary colour.", "What is two plus two?",
             "Which planet is closest to the sun?", "What do bees make?"]


def test_a_batch_with_3_bad_lines(keel_server: KeelServer) -> None:
    lines = [json.dumps({"custom_id": f"q-{i}", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": "smollm2", "max_tokens": 8, "temperature": 0,
                                  "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]}})
             for i in range(N)]
    lines[10] = lines[10][:-5]  # truncated JSON
    lines[20] = json.dumps({"custom_id": "q-20", "method": "POST", "url": "/v1/chat/completions",
                            "body": {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}})
    lines[30] = json.dumps({"custom_id": "q-29", "method": "POST", "url": "/v1/chat/completions",
                            "body": {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]}})
    client = openai.OpenAI(base_url=f"{keel_server.url}/v1", api_key=keel_server.keys["chat"], max_retries=0)
    f = client.files.create(file=("questions.jsonl", ("\n".join(lines) + "\n").encode()), purpose="batch")
    t0 = time.monotonic()
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() - t0 < 600, batch.request_counts
        time.sleep(1)
        batch = client.batches.retrieve(batch.id)
    took = time.monotonic() - t0
    print(f"batch of {N} (3 bad) on SmolLM2: {took:.1f} s, {batch.request_counts}")
    assert batch.status == "completed"
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (N, N - 3, 3)
    out = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    assert len(out) == N - 3 and all(r["response"]["status_code"] == 200 for r in out)
    assert all(r["response"]["body"]["choices"][0]["message"]["content"] for r in out)
    errors = {r["custom_id"]: r for r in (json.loads(x) for x in
                                          client.files.content(batch.error_file_id).text.splitlines())}
    assert errors[None]["error"]["code"] == "invalid_json" and errors[None]["error"]["line"] == 11
    assert errors["q-20"]["response"]["status_code"] == 404  # the model does not exist: the route's own answer
    assert errors["q-29"]["error"]["code"] == "duplicate_custom_id"
    # each answer is traced and has its lineage, like an interactive one, under the batch owner's key
    answer_id = out[0]["response"]["body"]["id"]
    rec = httpx.get(f"{keel_server.url}/v1/lineage/{answer_id}", headers=keel_server.headers("chat"), timeout=30)
    assert rec.status_code == 200 and rec.json()["route"]["alias"] == "smollm2"
    assert out[0]["response"]["body"]["guardrails"].startswith("default@")
