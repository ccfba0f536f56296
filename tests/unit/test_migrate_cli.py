"""``keel migrate``: every store at this release's schema, in the home and in the shared Postgres, without a
model loaded or a backend started (nor an external MCP server reached, nor another process's agent runs
swept); a second run changes nothing."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import psycopg
from typer.testing import CliRunner

from app.cli.main import app
from tests.postgres import with_database

runner = CliRunner()


def tables(url: str) -> set[str]:
    with psycopg.connect(url, autocommit=True) as conn:
        return {r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'").fetchall()}


def versions(url: str) -> dict[str, str]:
    with psycopg.connect(url, autocommit=True) as conn:
        return {t: conn.execute(f"SELECT version_num FROM {t}").fetchone()[0]
                for t in sorted(tables(url)) if t.startswith("alembic_version_")}


def test_migrate_brings_every_store_to_head_once(tmp_path: Path, postgres_url: str, postgres_server: str,
                                                  monkeypatch) -> None:
    audit_db = urlsplit(postgres_url).path.lstrip("/") + "_audit"
    audit_url = with_database(postgres_url, audit_db)
    with psycopg.connect(postgres_server, autocommit=True) as admin:  # the guardrail audit in a database of its own
        admin.execute(f'CREATE DATABASE "{audit_db}"')
    monkeypatch.setenv("KEEL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KEEL_DATABASE_URL", postgres_url)
    monkeypatch.setenv("KEEL_JOBS__URL", postgres_url)  # the shared queue, and with it pipelines and fine-tuning
    monkeypatch.setenv("KEEL_GUARDRAILS__AUDIT_URL", audit_url)
    first = runner.invoke(app, ["migrate"])
    assert first.exit_code == 0, first.output
    assert "every store is at this release's schema" in " ".join(first.output.split())
    shared = tables(postgres_url)
    for version_table in ("alembic_version_keys", "alembic_version_prompts", "alembic_version_routing",
                          "alembic_version_releases", "alembic_version_evals", "alembic_version_lineage",
                          "alembic_version_agent_runs", "alembic_version_audit", "alembic_version_monitor",
                          "alembic_version_pipelines", "alembic_version_batch", "alembic_version_responses",
                          "alembic_version_ingest", "alembic_version_finetune"):
        assert version_table in shared, sorted(shared)
    assert {"checkpoints", "lineage_schedule", "eval_runs", "audit_events", "drift_checks", "pipeline_runs",
            "file_chunks", "responses", "rag_snapshots"} <= shared
    assert {"audit_events", "alembic_version_audit"} <= tables(audit_url)  # opened even though nothing is served
    home = tmp_path / "home"  # what lives in the home: traces and files; no store
    moved = {"monitor.db", "pipelines.db", "batches.db", "responses.db", "rag.db", "evals.db", "lineage.db",
             "keel.db", "routing.db", "releases.db", "jobs.db", "tools.db"}
    assert not moved & {p.name for p in home.rglob("*.db")}, sorted(p.name for p in home.rglob("*.db"))
    before = versions(postgres_url)
    again = runner.invoke(app, ["migrate"])
    assert again.exit_code == 0, again.output
    assert versions(postgres_url) == before and tables(postgres_url) == shared  # nothing left to do


def test_an_unreachable_database_is_one_line(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("KEEL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KEEL_DATABASE_URL", "postgresql://keel:secret@127.0.0.1:1/keel?connect_timeout=2")
    r = runner.invoke(app, ["migrate"])
    assert r.exit_code == 1 and "store_unavailable" in r.output and "secret" not in r.output, r.output
    assert "Traceback" not in r.output
