"""``keel migrate``: every store at this release's schema, in the home and in the shared Postgres, without a
model loaded or a backend started; a second run finds nothing to do."""

from __future__ import annotations

from pathlib import Path

import psycopg
from typer.testing import CliRunner

from app.cli.main import app

runner = CliRunner()


def test_migrate_brings_every_store_to_head_once(tmp_path: Path, postgres_url: str, monkeypatch) -> None:
    monkeypatch.setenv("KEEL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KEEL_DATABASE_URL", postgres_url)
    first = runner.invoke(app, ["migrate"])
    assert first.exit_code == 0, first.output
    assert "every store is at this release's schema" in " ".join(first.output.split())
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        tables = {r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'").fetchall()}
    for version_table in ("alembic_version_keys", "alembic_version_prompts", "alembic_version_routing",
                          "alembic_version_releases", "alembic_version_evals", "alembic_version_lineage",
                          "alembic_version_agent_runs", "alembic_version_audit"):
        assert version_table in tables, sorted(tables)
    assert {"checkpoints", "lineage_schedule", "eval_runs", "audit_events"} <= tables
    home = tmp_path / "home"  # what lives in the home: its own SQLite stores
    assert (home / "monitor.db").exists() and not (home / "evals.db").exists() and not (home / "lineage.db").exists()
    again = runner.invoke(app, ["migrate"])
    assert again.exit_code == 0, again.output


def test_an_unreachable_database_is_one_line(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("KEEL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KEEL_DATABASE_URL", "postgresql://keel:secret@127.0.0.1:1/keel?connect_timeout=2")
    r = runner.invoke(app, ["migrate"])
    assert r.exit_code == 1 and "store_unavailable" in r.output and "secret" not in r.output, r.output
    assert "Traceback" not in r.output
