"""Batches (lifecycle.batch, app/api/routes/batches.py) through the unchanged ``openai`` client against a real
API on a localhost port (scripted model backend): files, batches, bad lines, ownership, cancel, a restart
mid-batch, and yielding to interactive traffic."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

import openai
import pytest
from rich.console import Console
from typer.testing import CliRunner

from app.cli import batch as batch_cli
from app.cli.main import app as keel
from lifecycle.batch.service import BatchService, parse_lines
from lifecycle.batch.settings import BatchSettings
from tests.cli_server import ApiServer, cli_env
from tests.fakes.llm import ScriptedBackend

SETTINGS = {"backends": {"local": {"kind": "openai", "base_url": "http://unused/v1", "retries": 0}},
            "models": {"m": {"backend": "local", "model": "fake"}}, "default_model": "m",
            "guardrails": {"enabled": False}, "auth": {"default_rate_limit_per_minute": 100_000},
            "jobs": {"heartbeat_s": 0.2, "poll_s": 0.05}}


def line(cid: str, question: str = "hi", **body: Any) -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": "m", "messages": [{"role": "user", "content": question}], **body}})


def requests_file(n: int, *, bad: bool = True) -> bytes:
    lines = [line(f"req-{i}", f"question {i}") for i in range(n)]
    if bad:
        lines.insert(3, "{not json")
        lines.insert(7, line("req-1"))  # a repeated custom_id
        lines.insert(9, json.dumps({"custom_id": "wrong-url", "method": "POST", "url": "/v1/embeddings",
                                    "body": {"input": "x"}}))
        lines.append(line("bad-body", temperature="hot"))
    return ("\n".join(lines) + "\n").encode()


def server(home: Path, backend: ScriptedBackend, **extra: Any) -> ApiServer:
    return ApiServer(home, settings={**SETTINGS, **extra}, backends={"local": backend},
                     keys={"alice": ["chat"], "bob": ["chat"], "admin": ["admin"]}).start()


def client(api: ApiServer, who: str = "alice") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api.url}/v1", api_key=api.keys[who], max_retries=0)


def wait(c: openai.OpenAI, batch_id: str, statuses: tuple[str, ...] = ("completed",), timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        b = c.batches.retrieve(batch_id)
        if b.status in statuses:
            return b
        assert time.monotonic() < deadline, f"batch still {b.status}: {b.request_counts}"
        time.sleep(0.1)


def jsonl(c: openai.OpenAI, file_id: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in c.files.content(file_id).text.splitlines() if x.strip()]


def test_a_batch_with_bad_lines_answers_the_rest_and_reports_each_bad_line(tmp_path: Path) -> None:
    api = server(tmp_path, ScriptedBackend(reply="An answer."))
    try:
        c = client(api)
        f = c.files.create(file=("requests.jsonl", requests_file(20)), purpose="batch")
        assert f.object == "file" and f.purpose == "batch" and f.filename == "requests.jsonl"
        b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                             metadata={"run": "nightly"})
        assert b.status in ("validating", "in_progress") and b.metadata == {"run": "nightly"}
        done = wait(c, b.id)
        assert done.request_counts.total == 24 and done.request_counts.completed == 20
        assert done.request_counts.failed == 4 and done.completed_at and done.in_progress_at
        out = jsonl(c, done.output_file_id)
        assert sorted(r["custom_id"] for r in out) == sorted(f"req-{i}" for i in range(20))
        first = out[0]["response"]
        assert first["status_code"] == 200 and first["body"]["object"] == "chat.completion"
        assert first["body"]["choices"][0]["message"]["content"] == "An answer."
        errors = {(e["error"]["code"], e["custom_id"]) for e in jsonl(c, done.error_file_id)}
        assert errors == {("invalid_json", None), ("duplicate_custom_id", "req-1"), ("mismatched_url", "wrong-url"),
                          ("invalid_request", "bad-body")}
        lines = {e["error"]["code"]: e["error"].get("line") for e in jsonl(c, done.error_file_id)}
        assert lines["invalid_json"] == 4 and lines["duplicate_custom_id"] == 8
        assert [x.id for x in c.batches.list().data] == [b.id]
    finally:
        api.stop()


def test_an_embeddings_batch_embeds_each_line_as_the_embeddings_route_would(tmp_path: Path) -> None:
    api = server(tmp_path, ScriptedBackend(reply="unused"))
    try:
        c = client(api)
        model = next(m.id for m in c.models.list().data if "embedding model" in (getattr(m, "description", "")
                                                                                 or ""))
        texts = ["The museum opens at 9.", "Tickets cost 12 euros."]
        rows = [{"custom_id": f"e-{i}", "method": "POST", "url": "/v1/embeddings",
                 "body": {"model": model, "input": t}} for i, t in enumerate(texts)]
        rows.append({"custom_id": "e-bad", "method": "POST", "url": "/v1/embeddings",
                     "body": {"model": model, "input": []}})
        f = c.files.create(file=("emb.jsonl", "\n".join(json.dumps(r) for r in rows).encode()), purpose="batch")
        done = wait(c, c.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h").id)
        assert (done.request_counts.completed, done.request_counts.failed) == (2, 1), jsonl(c, done.error_file_id)
        out = {r["custom_id"]: r["response"]["body"] for r in jsonl(c, done.output_file_id)}
        direct = c.embeddings.create(model=model, input=texts).data
        for i, d in enumerate(direct):  # the same vectors the route gives
            got = out[f"e-{i}"]["data"][0]["embedding"]
            assert max(abs(a - b) for a, b in zip(got, d.embedding, strict=True)) < 1e-5
        [bad] = jsonl(c, done.error_file_id)
        assert bad["custom_id"] == "e-bad" and bad["response"]["status_code"] == 400
    finally:
        api.stop()


def test_files_and_batches_belong_to_the_key_and_bad_requests_say_what_to_fix(tmp_path: Path) -> None:
    api = server(tmp_path, ScriptedBackend())
    try:
        alice, bob = client(api), client(api, "bob")
        f = alice.files.create(file=("r.jsonl", requests_file(2, bad=False)), purpose="batch")
        with pytest.raises(openai.NotFoundError):
            bob.files.retrieve(f.id)
        with pytest.raises(openai.NotFoundError):
            bob.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        assert client(api, "admin").files.retrieve(f.id).id == f.id
        with pytest.raises(openai.BadRequestError, match="purpose 'fine-tune' is not supported"):
            alice.files.create(file=("r.jsonl", b'{"a": 1}\n'), purpose="fine-tune")
        with pytest.raises(openai.BadRequestError, match="the file is empty"):
            alice.files.create(file=("r.jsonl", b"\n\n"), purpose="batch")
        with pytest.raises(openai.BadRequestError):
            alice.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
        with pytest.raises(openai.NotFoundError):
            alice.batches.retrieve("batch_nope")
        b = alice.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        wait(alice, b.id)
        with pytest.raises(openai.NotFoundError):
            bob.batches.retrieve(b.id)
        assert alice.files.delete(f.id).deleted
        with pytest.raises(openai.NotFoundError):
            alice.files.content(f.id)
    finally:
        api.stop()


def test_cancel_keeps_what_finished(tmp_path: Path) -> None:
    backend = ScriptedBackend(reply="slow answer", delay_s=0.05)
    api = server(tmp_path, backend, batch={"concurrency": 1})
    try:
        c = client(api)
        f = c.files.create(file=("r.jsonl", requests_file(200, bad=False)), purpose="batch")
        b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        deadline = time.monotonic() + 30
        while c.batches.retrieve(b.id).request_counts.completed < 3:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert c.batches.cancel(b.id).status in ("cancelling", "cancelled")
        done = wait(c, b.id, ("cancelled",))
        assert 3 <= done.request_counts.completed < 200 and done.cancelled_at
        assert len(jsonl(c, done.output_file_id)) == done.request_counts.completed
    finally:
        api.stop()


def test_a_restart_mid_batch_resumes_without_answering_a_line_twice(tmp_path: Path) -> None:
    first = ScriptedBackend(reply="first", delay_s=0.05)
    api = server(tmp_path, first, batch={"concurrency": 1})
    c = client(api)
    f = c.files.create(file=("r.jsonl", requests_file(60, bad=False)), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 30
    while c.batches.retrieve(b.id).request_counts.completed < 5:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    api.stop()  # the process stops mid-batch
    answered_before = first.calls
    second = ScriptedBackend(reply="second")
    api = server(tmp_path, second)
    try:
        c = client(api, "admin")  # the test server made new keys: the batch's owner is the first alice
        done = wait(c, b.id)
        assert done.request_counts.completed == 60
        out = jsonl(c, done.output_file_id)
        assert sorted(r["custom_id"] for r in out) == sorted(f"req-{i}" for i in range(60))
        assert answered_before + second.calls == 60  # each line once
    finally:
        api.stop()


async def test_batch_work_yields_to_interactive_requests() -> None:
    load = {"n": 0}
    settings = BatchSettings(concurrency=4, concurrency_under_load=1, yield_s=0)
    svc = BatchService(store=None, runner=None, settings=settings,  # type: ignore[arg-type]
                       load=lambda: load["n"] + svc._active)
    running: set = set()
    for _ in range(4):
        await asyncio.wait_for(svc._slot(running), 1)
        running.add(object())
    assert svc._active == 4
    running.clear()
    svc._active = 1
    running.add(object())
    load["n"] = 2  # two interactive requests in flight: one batch request at a time
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(svc._slot(running), 0.2)
    load["n"] = 0
    await asyncio.wait_for(svc._slot(running), 1)


async def test_batch_work_stays_yielded_for_a_while_after_interactive_requests() -> None:
    """A conversation's next request comes seconds after the last: it should not meet a fresh wave of batch
    requests that started in the gap."""
    load = {"n": 1}
    settings = BatchSettings(concurrency=4, concurrency_under_load=1, yield_s=0.5)
    svc = BatchService(store=None, runner=None, settings=settings,  # type: ignore[arg-type]
                       load=lambda: load["n"] + svc._active)
    running: set = set()
    await asyncio.wait_for(svc._slot(running), 1)  # one batch request beside the interactive one
    running.add(object())
    load["n"] = 0  # the interactive request has finished
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(svc._slot(running), 0.2)  # still yielding
    await asyncio.wait_for(svc._slot(running), 1)  # yield_s later: full concurrency again
    assert svc._active == 2


def test_lines_are_checked_one_by_one(tmp_path: Path) -> None:
    p = tmp_path / "r.jsonl"
    p.write_bytes(b'\n'.join([line("a").encode(), b"[1, 2]", b'{"custom_id": ""}',
                              json.dumps({"custom_id": "g", "method": "GET", "url": "/v1/chat/completions",
                                          "body": {}}).encode(),
                              json.dumps({"custom_id": "s", "url": "/v1/chat/completions", "body": "x"}).encode(),
                              b"", line("b").encode()]))
    ok, bad = parse_lines(p, "/v1/chat/completions")
    assert [(n, cid) for n, cid, _ in ok] == [(1, "a"), (7, "b")]
    assert [(n, code) for n, _, code, _ in bad] == [(2, "invalid_request"), (3, "invalid_custom_id"),
                                                    (4, "invalid_method"), (5, "invalid_body")]


def test_the_cli_creates_follows_and_downloads_a_batch(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(batch_cli, "console", Console(width=250, highlight=False))

    api = server(tmp_path / "server", ScriptedBackend(reply="From the CLI."))
    try:
        cli_env(monkeypatch, tmp_path, api.keys["alice"])
        reqs = tmp_path / "requests.jsonl"
        reqs.write_bytes(requests_file(6))
        runner = CliRunner()
        created = runner.invoke(keel, ["batch", "create", str(reqs), "--wait", "--url", api.url])
        assert created.exit_code == 0, created.output
        batch_id = re.search(r"batch (batch_\w+) started", created.output)[1]
        assert "6/10 answered, 4 failed" in created.output
        listed = runner.invoke(keel, ["batch", "list", "--url", api.url])
        assert batch_id in listed.output and "completed" in listed.output
        out = runner.invoke(keel, ["batch", "results", batch_id, "-o", str(tmp_path / "out"), "--url", api.url])
        assert out.exit_code == 0, out.output
        answers = (tmp_path / "out" / f"{batch_id}_output.jsonl").read_text().splitlines()
        assert len(answers) == 6 and "From the CLI." in answers[0]
        assert len((tmp_path / "out" / f"{batch_id}_error.jsonl").read_text().splitlines()) == 4
        missing = runner.invoke(keel, ["batch", "status", "batch_nope", "--url", api.url])
        assert missing.exit_code == 1 and "batch_not_found" in missing.output
    finally:
        api.stop()


async def test_batch_work_does_not_yield_to_shadows_probes_or_eval_runs(tmp_path: Path) -> None:
    """Only model calls a person waits on hold batch work back: a release's shadow (or probe) and an eval run's
    cases are counted apart, or a batch on a shadowed endpoint would crawl at concurrency_under_load throughout."""
    from app.container import Container
    from app.core.types import ChatMessage
    from app.services.chat import ChatRequest
    from app.settings import load_settings
    from ingest import build_rag
    from ingest.embedding import HashingEmbedder

    settings = load_settings(home=tmp_path, backends={"local": {"kind": "openai", "base_url": "http://unused/v1"}},
                             models={"m": {"backend": "local", "model": "fake"}}, default_model="m",
                             guardrails={"enabled": False})
    slow = ScriptedBackend(reply="a slow answer")
    slow.delay_s = 0.05  # per token
    container = await Container.build(settings, backends={"local": slow},
                                      rag=build_rag(settings, embedder=HashingEmbedder()))
    try:
        load = container.batches.load
        asked = (ChatMessage("user", "hi"),)
        for request, interactive in ((ChatRequest(model="m", messages=asked, shadow=True), 0),
                                     (ChatRequest(model="m", messages=asked, background=True), 0),
                                     (ChatRequest(model="m", messages=asked), 1)):
            task = asyncio.create_task(container.chat.complete(request))
            for _ in range(400):  # until its model call has started
                if container.chat.active:
                    break
                await asyncio.sleep(0.005)
            assert container.chat.active == 1 and load() == interactive, request
            await task
        assert container.chat.active == container.chat.background == 0
    finally:
        await container.aclose()
