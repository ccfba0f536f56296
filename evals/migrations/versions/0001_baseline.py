"""Baseline: the eval tables as the release before Alembic created them (existing ones are kept). On Postgres
(new there: no earlier release) each table also gets ``seq``, the insertion order SQLite's rowid gives.

Revision ID: 0001
Revises: (none)
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    seq = "seq BIGSERIAL," if op.get_bind().dialect.name == "postgresql" else ""
    op.execute(f"""
        CREATE TABLE IF NOT EXISTS eval_runs (
            {seq}
            id TEXT PRIMARY KEY,
            suite TEXT NOT NULL,
            suite_hash TEXT NOT NULL,
            identity_key TEXT NOT NULL,
            identity TEXT NOT NULL,
            target_kind TEXT NOT NULL,
            prompt_name TEXT,
            prompt_version INTEGER,
            prompt_hash TEXT,
            status TEXT NOT NULL,
            passed INTEGER,
            cases_total INTEGER NOT NULL,
            baseline TEXT,
            summary TEXT,
            verdict TEXT,
            started_at TEXT NOT NULL,
            finished_at TEXT
        )""")
    op.execute("CREATE INDEX IF NOT EXISTS eval_runs_prompt ON eval_runs(prompt_name, prompt_version, passed)")
    op.execute("CREATE INDEX IF NOT EXISTS eval_runs_identity ON eval_runs(identity_key, status)")
    op.execute(f"""
        CREATE TABLE IF NOT EXISTS eval_results (
            {seq}
            run_id TEXT NOT NULL REFERENCES eval_runs(id) ON DELETE CASCADE,
            case_id TEXT NOT NULL,
            record TEXT NOT NULL,
            scores TEXT NOT NULL,
            error TEXT,
            cached INTEGER NOT NULL DEFAULT 0,
            created_at TEXT NOT NULL,
            PRIMARY KEY (run_id, case_id)
        )""")
    op.execute("""
        CREATE TABLE IF NOT EXISTS eval_cache (
            key TEXT PRIMARY KEY,
            record TEXT NOT NULL,
            created_at TEXT NOT NULL
        )""")


def downgrade() -> None:
    for table in ("eval_cache", "eval_results", "eval_runs"):
        op.execute(f"DROP TABLE IF EXISTS {table}")
