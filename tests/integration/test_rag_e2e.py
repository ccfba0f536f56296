"""Ingest → retrieve → grounded chat through the real API, real MiniLM embeddings, the embedded
Qdrant engine and the real SmolLM2 model behind vLLM."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import openai
import pytest

from tests.integration.conftest import KeelServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]
CORPUS = Path(__file__).parents[1] / "data" / "docs" / "corpus"


@pytest.fixture(scope="module")
def docs(keel_server: KeelServer) -> str:
    files = [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in sorted(CORPUS.iterdir())]
    r = httpx.post(f"{keel_server.url}/v1/ingest", files=files, data={"collection": "docs"},
                   headers=keel_server.headers("admin"), timeout=60)
    assert r.status_code == 202, r.text
    job = httpx.get(f"{keel_server.url}/v1/ingest/jobs/{r.json()['id']}?wait_s=60",
                    headers=keel_server.headers("admin"), timeout=90).json()
    assert job["state"] == "succeeded", job
    assert job["counts"]["added"] == len(files) and job["counts"]["chunks_total"] > len(files)
    return "docs"


def test_retrieve_returns_the_source_passage(keel_server: KeelServer, docs: str) -> None:
    r = httpx.post(f"{keel_server.url}/v1/retrieve", headers=keel_server.headers(), timeout=30,
                   json={"query": "When does SQLite automatically checkpoint the WAL file?", "collection": docs})
    top = r.json()["chunks"][:3]
    assert any(c["citation"]["source"].endswith("sqlite-wal.md") and "1000 pages" in c["text"] for c in top)


def test_grounded_chat_streams_an_answer_and_citations(keel_server: KeelServer, docs: str) -> None:
    body = {"model": f"rag:{docs}", "stream": True, "max_tokens": 80, "temperature": 0,
            "messages": [{"role": "user", "content": "When does SQLite automatically checkpoint the WAL file?"}]}
    with httpx.stream("POST", f"{keel_server.url}/v1/chat/completions", json=body,
                      headers=keel_server.headers(), timeout=120) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    answer = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    guard = [c["guardrail"] for c in chunks if c.get("guardrail")]
    # The rag policy checks groundedness: a small model's unsupported answer is withdrawn with a
    # guardrail event that says why. Either way the client is never left with nothing.
    assert answer.strip() or (guard and guard[-1]["type"] == "retraction" and guard[-1]["message"]), chunks
    citations = chunks[-1]["citations"]
    assert citations and citations[0]["index"] == 1
    assert any(c["source"].endswith("sqlite-wal.md") for c in citations)
    assert all({"chunk_id", "snapshot_id", "char_start", "char_end", "cited"} <= set(c) for c in citations)


def test_plain_openai_client_ignores_the_extra_fields(keel_server: KeelServer, docs: str) -> None:
    client = openai.OpenAI(base_url=f"{keel_server.url}/v1", api_key=keel_server.keys["chat"], max_retries=0)
    with client.chat.completions.stream(model=f"rag:{docs}", max_tokens=60, temperature=0, messages=[
            {"role": "user", "content": "How do I make a virtual environment that can see system packages?"}]) as s:
        # (get_final_completion() would refuse a length-capped answer; the deltas are what matter here)
        text = "".join(e.delta for e in s if e.type == "content.delta")
    assert text.strip()
    got = client.chat.completions.create(model=f"rag:{docs}", max_tokens=60, temperature=0, messages=[
        {"role": "user", "content": "Should I commit my virtualenv directory to git?"}])
    assert got.model_extra["citations"][0]["source"].endswith(".md")


PEOPLE = {
    "lighthouse.md": ("# The Eddystone Lighthouse\n\nThe fourth Eddystone lighthouse was designed by James Douglass "
                      "and completed in 1882. It replaced Smeaton's Tower.",
                      "Who designed the fourth Eddystone lighthouse?", "Douglass"),
    "radium.md": ("# Radium\n\nRadium was discovered in 1898 by Marie Curie and Pierre Curie in Paris, in a shed "
                  "next to the School of Physics.", "Who discovered radium?", "Curie"),
    "compiler.md": ("# The first compiler\n\nThe A-0 system, often called the first compiler, was written by "
                    "Grace Hopper in 1952 for the UNIVAC I.", "Who wrote the A-0 compiler?", "Hopper"),
    "penicillin.md": ("# Penicillin\n\nPenicillin was discovered in 1928 by Alexander Fleming at St Mary's "
                      "Hospital in London.", "Who discovered penicillin?", "Fleming"),
    "telephone.md": ("# The telephone\n\nAlexander Graham Bell was granted the first US patent for the telephone "
                     "in 1876.", "Who was granted the first US patent for the telephone?", "Bell"),
}


def test_answers_whose_answer_is_a_name_keep_the_name(keel_server: KeelServer) -> None:
    """The PII guard used to mask the names in the passages and the question before the model saw them, so
    answers read "The answer is: <PERSON>." Names the sources hold now reach the model and the answer."""
    files = [("files", (name, text.encode(), "text/markdown")) for name, (text, _, _) in PEOPLE.items()]
    r = httpx.post(f"{keel_server.url}/v1/ingest", files=files, data={"collection": "people"},
                   headers=keel_server.headers("admin"), timeout=60)
    job = httpx.get(f"{keel_server.url}/v1/ingest/jobs/{r.json()['id']}?wait_s=60",
                    headers=keel_server.headers("admin"), timeout=90).json()
    assert job["state"] == "succeeded", job
    named = 0
    for _, question, surname in PEOPLE.values():
        # one passage: with five the 135M model often answers from the wrong one
        body = {"model": "smollm2", "rag": {"collection": "people", "top_k": 1}, "max_tokens": 60,
                "temperature": 0, "messages": [{"role": "user", "content": question}]}
        got = httpx.post(f"{keel_server.url}/v1/chat/completions", json=body, headers=keel_server.headers(),
                         timeout=120).json()
        answer = got["choices"][0]["message"]["content"]
        assert not re.search(r"<\s*person|person_?\d|\[person", answer, re.IGNORECASE), got  # no placeholder
        assert not [e for e in got.get("guardrail_events") or [] if e["type"] == "redaction"], got
        named += surname in answer
    # the model may still phrase an answer without the name, or the groundedness check withdraw one
    assert named >= 3, f"only {named} of {len(PEOPLE)} answers named the person"
