"""`keel traces list|show` and `keel lineage` against a real Keel API: uvicorn on a localhost port in a thread, the
container built on a scripted backend with a cheap guardrail policy (keel/secrets on the input), a registry prompt,
a document collection (hashing embedder) and content capture on; the CLI talks HTTP to it as it does in production.

The commands are mounted here as app/cli/main.py mounts them (`keel traces ...`, `keel lineage ...`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from app.cli import observe
from app.cli.observe import key_attributes, lineage, span_tree, traces_app, waterfall
from tests.cli_server import ApiServer, cli_env
from tests.fakes.llm import ScriptedBackend

DOC = "# Lighthouses\n\nThe Eddystone lighthouse stands on rocks south of Plymouth. Its tower was completed in 1882.\n"
POLICY = "version: '1'\npolicies:\n  default:\n    input:\n      - {validator: keel/secrets, on_fail: redact}\n"

keel = typer.Typer()
keel.add_typer(traces_app, name="traces")
keel.command("lineage")(lineage)
runner = CliRunner()


class Server(ApiServer):
    """The API on a scripted model with a cheap input guard (keel/secrets) and content capture on."""

    def __init__(self, home: Path) -> None:
        policy = home / "policy.yaml"
        policy.write_text(POLICY)
        self.fake = ScriptedBackend(reply="The tower was completed in 1882 [1].")
        super().__init__(home, settings=dict(
            backends={"local": {"kind": "openai", "base_url": "http://unused/v1", "retries": 0}},
            models={"m": {"backend": "local", "model": "fake-model"}}, default_model="m",
            guardrails={"policy_path": str(policy), "injection_classifier": False},
            releases={"check_interval_s": 0}, auth={"default_rate_limit_per_minute": 100_000},
            otel={"capture_content": True},
        ), backends={"local": self.fake},
            keys={"admin": ["admin"], "chat": ["chat"], "other": ["chat"], "ingest": ["ingest"]})

    def traffic(self) -> dict[str, str]:
        """A prompted answer, a grounded one (rated), and one the model fails half way: their completion ids."""
        with httpx.Client(base_url=self.url, timeout=30) as c:
            r = c.post("/v1/prompts", headers=self.h("admin"), json={
                "name": "brief", "content": {"messages": [{"role": "system", "content": "Be brief."}]}})
            assert r.status_code == 201, r.text
            r = c.post("/v1/ingest", headers=self.h("ingest"), data={"collection": "docs"},
                       files=[("files", ("lighthouse.md", DOC.encode(), "text/plain"))])
            job = c.get(f"/v1/ingest/jobs/{r.json()['id']}?wait_s=30", headers=self.h("ingest")).json()
            assert job["state"] == "succeeded", job
            ids = {}
            r = c.post("/v1/chat/completions", headers=self.h("chat"), json={
                "model": "m", "prompt": {"ref": "brief@1"}, "max_tokens": 8,
                "messages": [{"role": "user", "content": "My email is jane.doe@example.com. Say hi."}]})
            assert r.status_code == 200, r.text
            ids["prompted"] = r.json()["id"]
            r = c.post("/v1/chat/completions", headers=self.h("chat"), json={
                "model": "rag:docs", "messages": [{"role": "user", "content": "When was the tower completed?"}]})
            assert r.status_code == 200, r.text
            ids["grounded"] = r.json()["id"]
            r = c.post("/v1/feedback", headers=self.h("chat"), json={"id": ids["grounded"], "rating": "up",
                                                                     "comment": "spot on"})
            assert r.status_code in (200, 201, 204), r.text
            self.fake.fail_after = 2
            try:
                r = c.post("/v1/chat/completions", headers=self.h("chat"), json={
                    "model": "m", "messages": [{"role": "user", "content": "Fail half way."}]})
            finally:
                self.fake.fail_after = None
            assert r.status_code == 500, r.text
            return ids


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("keel-observe-cli")).start()
    s.ids = s.traffic()
    yield s
    s.stop()


@pytest.fixture
def run(server, tmp_path, monkeypatch):
    """Runs `keel traces ...` / `keel lineage ...` with the admin key (KEEL_API_KEY) on a wide console."""
    cli_env(monkeypatch, tmp_path, server.keys["admin"])
    monkeypatch.setattr(observe, "console", Console(width=250, highlight=False))

    def invoke(*args: str, code: int = 0, url: bool = True, key: str | None = None) -> str:
        extra = ["--url", server.url] if url else []
        if key is not None:
            extra += ["--api-key", server.keys[key]]
        result = runner.invoke(keel, [*args, *extra])
        assert result.exit_code == code, result.output
        assert "Traceback" not in result.output
        return result.output

    return invoke


def trace_of(server, completion_id: str) -> str:
    r = httpx.get(f"{server.url}/v1/traces", params={"response_id": completion_id}, headers=server.h("admin"))
    (t,) = r.json()["data"]
    return t["trace_id"]


# -- keel traces list ----------------------------------------------------------------------------------------


def test_list_shows_root_start_duration_spans_errors_and_completion_id(server, run) -> None:
    out = run("traces", "list", "--limit", "50")
    head = next(line for line in out.splitlines() if "trace id" in line)
    assert re.split(r"\s{2,}", head.strip()) == ["trace id", "root", "started", "duration", "spans", "errors",
                                                  "completion id"]
    listed = {t["trace_id"]: t for t in json.loads(run("traces", "list", "--limit", "50", "--json"))}
    for name, errors in (("prompted", 0), ("grounded", 0), ("failed", None)):
        if name == "failed":
            t = next(t for t in listed.values() if t["errors"])
        else:
            t = listed[trace_of(server, server.ids[name])]
            assert t["errors"] == errors and t["spans"] >= 5  # server, keel.chat, guard, prompt/rag, model call
        line = re.compile(rf"^\s*{t['trace_id']}\s+POST /v1/chat/completions\s+(\S+ )?\d\d:\d\d:\d\d\s+"
                          rf"\d+(\.\d+)? (ms|s)\s+{t['spans']}\s+{t['errors']}\s+{t['response_id']}\s*$", re.M)
        assert line.search(out), (name, out)


def test_list_filters_by_completion_id_and_span_name_and_pages_back(server, run) -> None:
    out = run("traces", "list", "--response-id", server.ids["grounded"])
    lines = [line for line in out.splitlines() if re.match(r"\s*[0-9a-f]{32}\s", line)]
    assert len(lines) == 1 and server.ids["grounded"] in lines[0]

    out = run("traces", "list", "--name", "keel.rag")
    assert server.ids["grounded"] in out and server.ids["prompted"] not in out

    # (reading traces is traced too: the chats' traces are the stable ones to page over)
    first = json.loads(run("traces", "list", "--limit", "1", "--name", "keel.chat", "--json"))
    assert len(first) == 1 and set(first[0]) >= {"trace_id", "root", "start_ns", "duration_ms", "spans", "errors"}
    paged = run("traces", "list", "--limit", "1", "--name", "keel.chat")
    assert f"older: keel traces list --before-ns {first[0]['start_ns']} --name keel.chat" in paged
    older = json.loads(run("traces", "list", "--limit", "1", "--name", "keel.chat", "--before-ns",
                           str(first[0]["start_ns"]), "--json"))
    assert older and older[0]["start_ns"] < first[0]["start_ns"]

    out = run("traces", "list", "--response-id", "chatcmpl-nothing-like-it")
    assert out.startswith("no traces matching the filters")


def test_list_needs_a_monitor_key_and_a_server(server, run) -> None:
    out = run("traces", "list", key="chat", code=1)
    assert " ".join(out.split()).startswith("error (insufficient_scope): this API key lacks the 'monitor' scope")
    out = run("traces", "list", "--url", "http://127.0.0.1:9", url=False, code=1)
    assert "cannot reach http://127.0.0.1:9" in out


# -- keel traces show ------------------------------------------------------------------------------------------


def test_show_draws_the_span_tree_with_durations_and_key_attributes(server, run) -> None:
    trace_id = trace_of(server, server.ids["prompted"])
    out = run("traces", "show", trace_id)
    lines = out.splitlines()
    assert lines[0].startswith(f"trace {trace_id} · ") and " spans · " in lines[0] and "error" not in lines[0]
    spans = [line for line in lines if "|" in line and not line.startswith("span ")]
    names = [re.split(r"\s{2,}", re.sub(r"^[│├└─ ]*", "", line))[0] for line in spans]
    # the output guard's span covers the guarded stream: it starts once the model's answer flows
    assert names[:5] == ["POST /v1/chat/completions", "keel.auth", "keel.chat", "keel.prompt.render",
                         "keel.guardrails.input"]
    assert sorted(names[5:]) == ["chat fake-model", "keel.guardrails.output"], names
    assert spans[1].startswith("├─ keel.auth") and spans[2].startswith("└─ keel.chat")
    assert spans[3].startswith("   ├─ keel.prompt.render")
    assert re.match(r"   [├└]─ chat fake-model", spans[5 + names[5:].index("chat fake-model")])
    assert spans[-1].startswith("   └─ ")
    for line in spans:  # kind, start offset, duration and a bar between the trace's edges
        assert re.search(r"(server|internal|client)\s+\+\d+\.\d+ ms\s+\d+(\.\d+)? (ms|s)\s+\|[ █]+\|$", line), line
    assert re.search(r"\|█+\|$", spans[0])  # the root spans the whole trace
    text = " ".join(out.split())
    assert f"model m · answer {server.ids['prompted']} · prompt brief@1 · policy default@1+" in text
    assert "prompt brief@1 · hash sha256:" in text
    assert "policy default · stage input · verdicts secrets=pass" in text
    assert re.search(r"model fake-model · tokens \d+→\d+ · ttft \d+\.\d+ ms · finish stop · alias m · messages "
                     r"captured", text), text
    assert f"lineage of the answer: keel lineage {server.ids['prompted']}" in text


def test_show_with_attributes_and_json(server, run) -> None:
    out = run("traces", "show", trace_of(server, server.ids["prompted"]), "--attributes")
    assert "gen_ai.request.model = fake-model" in out and "keel.prompt.ref = brief@1" in out
    assert "event guardrail.verdict" in out and "keel.guardrails.validator=secrets" in out
    captured = next(line for line in out.splitlines() if "gen_ai.input.messages = " in line)
    assert "Say hi." in captured and "jane.doe@example.com" not in captured  # captured with personal data masked
    trace_id = trace_of(server, server.ids["grounded"])
    out = run("traces", "show", trace_id)
    assert "collection docs · chunks 1 · best score" in " ".join(out.split())
    body = json.loads(run("traces", "show", trace_id, "--json"))
    assert body["trace_id"] == trace_id and {s["name"] for s in body["spans"]} >= {"keel.rag.retrieve", "keel.chat"}


def test_show_marks_the_failed_spans(server, run) -> None:
    listed = json.loads(run("traces", "list", "--limit", "50", "--json"))
    failed = next(t for t in listed if t["errors"])
    out = run("traces", "show", failed["trace_id"])
    assert f"· {failed['errors']} error" in out.splitlines()[0]
    assert "ERROR: scripted failure" in out


def test_show_refuses_a_bad_or_unknown_trace_id(server, run) -> None:
    out = " ".join(run("traces", "show", "not-a-trace", code=1).split())
    assert out.startswith("error (invalid_request): a trace id is 32 lower-case hex digits")
    out = " ".join(run("traces", "show", "0" * 32, code=1).split())
    assert out.startswith(f"error (trace_not_found): no trace {'0' * 32}")


# -- keel lineage ------------------------------------------------------------------------------------------------


def test_lineage_shows_prompt_route_guardrails_and_verdicts(server, run) -> None:
    out = run("lineage", server.ids["prompted"], key="chat")  # the key that got the answer
    text = " ".join(out.split())
    trace_id = trace_of(server, server.ids["prompted"])
    assert f"answer {server.ids['prompted']}" in text and "outcome ok" in text
    assert f"trace {trace_id} (keel traces show {trace_id})" in text
    assert re.search(r"version brief@1 │ │ hash sha256:[0-9a-f]{64}", text), text
    assert "no eval suite has run on this prompt version" in text
    assert "alias m │ │ backend local │ │ model fake-model │ │ adapter none │ │ routing config, revision 0" in text
    assert "not served through a release" in text
    assert "policy default@1+" in text and re.search(r"input\s+secrets\s+pass\s+none\s+0\.000", out)
    assert "passages" not in text  # not a grounded answer
    assert "no feedback on this answer yet" in text


def test_lineage_of_a_grounded_rated_answer_names_its_passages_and_feedback(server, run) -> None:
    out = run("lineage", server.ids["grounded"])
    text = " ".join(out.split())
    assert "version rag-answer@1" in text and "model asked for rag:docs" in text
    assert "passages (1)" in text and re.search(r"1\s+lighthouse\.md\s+\S+\s+snap_\S+\s+Lighthouses\s+0\.\d{4}\s+yes",
                                                  out), out
    assert "feedback (1)" in text and re.search(r"1\.00\s+spot on", out)
    rec = json.loads(run("lineage", server.ids["grounded"], "--json"))
    assert rec["id"] == server.ids["grounded"] and rec["retrieval"][0]["doc_id"] == "lighthouse.md"


def test_lineage_of_another_keys_answer_is_not_found(server, run) -> None:
    out = " ".join(run("lineage", server.ids["prompted"], key="other", code=1).split())
    assert out.startswith(f"error (lineage_not_found): no lineage for '{server.ids['prompted']}'")
    out = " ".join(run("lineage", "bad id!", code=1).split())
    assert out.startswith("error (invalid_request):")


# -- the text waterfall on its own -------------------------------------------------------------------------------


def _span(span_id: str, parent: str | None, name: str, start: int, end: int, **extra) -> dict:
    return {"span_id": span_id, "parent_id": parent, "name": name, "kind": extra.pop("kind", "INTERNAL"),
            "start_ns": start, "end_ns": end, "status": extra.pop("status", "UNSET"), "status_message": None,
            "attributes": extra.pop("attributes", {}), "events": [], "service": "keel"}


def test_a_span_whose_parent_is_elsewhere_is_a_root_and_children_follow_start_order() -> None:
    spans = [_span("c2", "a", "second", 30, 40), _span("a", "outside", "server", 0, 100, kind="SERVER"),
             _span("c1", "a", "first", 10, 20), _span("g", "c1", "grandchild", 12, 18),
             _span("x", "y", "cycle-x", 5, 6), _span("y", "x", "cycle-y", 5, 6)]
    rows = span_tree(spans)
    assert [(n.span["name"], n.depth) for n in rows[:4]] == [("server", 0), ("first", 1), ("grandchild", 2),
                                                             ("second", 1)]
    assert {n.span["name"] for n in rows} == {s["name"] for s in spans}  # a parent cycle still shows each span once
    lines = [t.plain for t in waterfall(spans[:4], width=120)]
    assert lines[1].startswith("server ") and lines[2].startswith("├─ first ")
    assert lines[3].startswith("│  └─ grandchild ") and lines[4].startswith("└─ second ")
    bars = [line.rsplit("|", 2)[1] for line in lines[1:]]
    assert bars[0] == "█" * len(bars[0])  # the root covers the whole axis
    assert bars[3].index("█") > bars[1].index("█")  # a later span's bar starts further right


def test_key_attributes_name_what_a_span_did() -> None:
    model = _span("m", None, "chat x", 0, 1, kind="CLIENT", attributes={
        "gen_ai.operation.name": "chat", "gen_ai.request.model": "x", "gen_ai.usage.input_tokens": 12,
        "gen_ai.usage.output_tokens": 3, "keel.ttft_ms": 41.5, "gen_ai.response.finish_reasons": ["length"]})
    assert key_attributes(model) == "model x · tokens 12→3 · ttft 41.5 ms · finish length"
    failed = _span("f", None, "keel.chat", 0, 1, status="ERROR", attributes={"error.type": "upstream_timeout"})
    assert key_attributes(failed) == "ERROR: upstream_timeout"
