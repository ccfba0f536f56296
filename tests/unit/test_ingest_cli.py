"""The typer commands, mounted on a throwaway app, with a model-free embedder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from app.core.settings import Settings
from ingest import build_rag, cli
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
