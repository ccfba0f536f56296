"""The typer commands, mounted on a throwaway app, with a model-free embedder."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import typer
from typer.testing import CliRunner

from app.cli import ingest as cli
from app.settings import Settings
from ingest import build_rag
from ingest.embedding import HashingEmbedder


@pytest.fixture
def app(tmp_path, monkeypatch):
    settings = Settings(home=tmp_path / "home", rag={"chunker": {"max_tokens": 40, "overlap_tokens": 8}})
    monkeypatch.setattr(cli, "_services", lambda: (settings, build_rag(settings, embedder=HashingEmbedder(64))))
    a = typer.Typer()
    a.command("ingest")(cli.ingest_command)
    a.command("search")(cli.search_command)
    a.add_typer(cli.snapshots_app, name="snapshots")
    return a


def test_ingest_search_snapshots(app, tmp_path: Path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# Alpha\n\n## Setup\n\nInstall the alpha package with pip before running it.\n")
    (docs / "b.txt").write_text("Beta notes about garbage collection.\n")
    (docs / "bad.json").write_text('{"body": 1}')
    runner = CliRunner()
    res = runner.invoke(app, ["ingest", str(docs), "--collection", "kb"])
    assert res.exit_code == 3, res.output  # done, with a rejection
    assert "added" in res.output and "bad_json_shape" in res.output
    (docs / "bad.json").unlink()
    res = runner.invoke(app, ["ingest", str(docs), "-c", "kb", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["unchanged"] == 2 and out["chunks_written"] == 0

    res = runner.invoke(app, ["search", "install alpha package", "-c", "kb", "-k", "1"])
    assert res.exit_code == 0 and "Alpha > Setup" in res.output and "a.md" in res.output
    res = runner.invoke(app, ["search", "notes", "-c", "kb", "--filter", "doc_kind=text", "--json"])
    hits = json.loads(res.output)["chunks"]
    assert [Path(h["citation"]["source"]).name for h in hits] == ["b.txt"]
    res = runner.invoke(app, ["search", "x", "-c", "missing"])
    assert res.exit_code == 1 and "collection_not_found" in res.output

    res = runner.invoke(app, ["snapshots", "list", "-c", "kb"])
    assert res.exit_code == 0 and res.output.count("snap_") == 2


def test_parse_filters():
    assert cli.parse_filters(["lang=en", "tag=a,b", "page>=2", "page<5", "n=3"]) == {
        "lang": "en", "tag": ["a", "b"], "page": {"gte": 2.0, "lt": 5.0}, "n": 3}
    with pytest.raises(typer.BadParameter):
        cli.parse_filters(["nonsense"])
    with pytest.raises(typer.BadParameter):
        cli.parse_filters(["page>=x"])


def test_search_goes_through_the_api_that_holds_the_store(tmp_path: Path, monkeypatch) -> None:
    """`keel search` while `keel serve` owns the embedded store: the CLI meets the store's lock (a real one:
    ``holder`` keeps the shard open) and asks the running API instead, with KEEL_API_KEY."""
    settings = Settings(home=tmp_path / "home")
    holder = build_rag(settings, embedder=HashingEmbedder(64))  # stands in for the server process
    holder.warm_up()
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "owls.md").write_text("# Owls\n\nBarn owls hunt at night by sound alone.\n")
    holder.pipeline.run([docs], "kb")
    monkeypatch.setattr(cli, "_services", lambda: (settings, build_rag(settings, embedder=HashingEmbedder(64))))
    monkeypatch.setattr(cli, "_api_up", lambda url: True)
    monkeypatch.setenv("KEEL_API_KEY", "keel-test-key")
    requests: list[httpx.Request] = []

    def api(request: httpx.Request) -> httpx.Response:  # the server's POST /v1/retrieve, over the holder
        requests.append(request)
        body = json.loads(request.content)
        res = holder.retriever.retrieve(body["query"], collection=body["collection"], top_k=body["top_k"],
                                        filters=body["filters"])
        return httpx.Response(200, json=res.model_dump())

    real_client = httpx.Client
    monkeypatch.setattr(httpx, "Client", lambda **kw: real_client(transport=httpx.MockTransport(api), **kw))
    a = typer.Typer()
    a.command("search")(cli.search_command)
    a.command("noop")(lambda: None)
    try:
        res = CliRunner().invoke(a, ["search", "owls at night", "-c", "kb", "-k", "1", "-f", "doc_kind=markdown",
                                     "--json"])
    finally:
        holder.close()
    assert res.exit_code == 0, res.output
    assert "held by the Keel API" in res.output
    hits = json.loads(res.output[res.output.index("{"):])["chunks"]
    assert [Path(h["citation"]["source"]).name for h in hits] == ["owls.md"]
    [req] = requests
    assert req.url.path == "/v1/retrieve" and req.headers["authorization"] == "Bearer keel-test-key"
    assert json.loads(req.content)["filters"] == {"doc_kind": "markdown"}


def test_ingest_goes_through_the_api_that_holds_the_store(tmp_path: Path, monkeypatch) -> None:
    """The same fallback (one helper) for `keel ingest`: server-side absolute paths, the job followed."""
    settings = Settings(home=tmp_path / "home")
    holder = build_rag(settings, embedder=HashingEmbedder(64))
    holder.warm_up()
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "owls.md").write_text("# Owls\n\nBarn owls hunt at night by sound alone.\n")
    holder.pipeline.run([tmp_path / "docs"], "kb")
    monkeypatch.setattr(cli, "_services", lambda: (settings, build_rag(settings, embedder=HashingEmbedder(64))))
    monkeypatch.setattr(cli, "_api_up", lambda url: True)
    monkeypatch.setattr(cli, "dev_key", lambda home: "keel-dev-key")  # no KEEL_API_KEY: the dev key
    monkeypatch.delenv("KEEL_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    job = {"id": "j1", "state": "succeeded", "collection": "kb", "snapshot_id": "snap_x", "files_total": 1,
           "files_done": 1, "chunks_written": 0, "rejections": [],
           "counts": {k: 0 for k in ("added", "updated", "deleted", "rejected", "repaired", "chunks_written",
                                     "chunks_total", "documents_total", "seconds")} | {"unchanged": 1}}
    requests: list[httpx.Request] = []

    def api(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(202 if request.method == "POST" else 200, json=job)

    real_client = httpx.Client
    monkeypatch.setattr(httpx, "Client", lambda **kw: real_client(transport=httpx.MockTransport(api), **kw))
    a = typer.Typer()
    a.command("ingest")(cli.ingest_command)
    a.command("noop")(lambda: None)
    try:
        res = CliRunner().invoke(a, ["ingest", "docs", "-c", "kb", "--json"])
    finally:
        holder.close()
    assert res.exit_code == 0, res.output
    assert "held by the Keel API" in res.output and '"unchanged": 1' in res.output
    assert requests[0].url.path == "/v1/ingest/paths" and requests[0].headers["authorization"] == "Bearer keel-dev-key"
    assert json.loads(requests[0].content)["paths"] == [str(tmp_path / "docs")]
