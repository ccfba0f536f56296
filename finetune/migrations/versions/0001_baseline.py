"""Baseline: the fine-tuning tables as the release before Alembic created them (existing ones are kept).

A jobs table of the first release, before adapter evaluation, gets the ``evals_state`` and ``evals``
columns (what the hand-kept ALTER TABLE list of that release added).

Revision ID: 0001
Revises: (none)
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
        CREATE TABLE IF NOT EXISTS jobs (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            state TEXT NOT NULL,
            spec_yaml TEXT NOT NULL,
            spec_hash TEXT NOT NULL,
            submitted_by TEXT NOT NULL DEFAULT '',
            created_at REAL NOT NULL,
            started_at REAL,
            finished_at REAL,
            updated_at REAL NOT NULL,
            step INTEGER NOT NULL DEFAULT 0,
            max_steps INTEGER NOT NULL DEFAULT 0,
            attempts INTEGER NOT NULL DEFAULT 0,
            worker TEXT,
            heartbeat_at REAL,
            cancel_requested INTEGER NOT NULL DEFAULT 0,
            error TEXT,
            error_code TEXT,
            metrics TEXT NOT NULL DEFAULT '{}',
            data_report TEXT,
            data_hash TEXT,
            run_dir TEXT NOT NULL,
            adapter_path TEXT,
            mlflow_run_id TEXT,
            model_name TEXT,
            model_version TEXT,
            evals_state TEXT,
            evals TEXT
        )""")
    op.execute("CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, created_at)")
    op.execute("""
        CREATE TABLE IF NOT EXISTS deployments (
            alias TEXT PRIMARY KEY,
            model TEXT NOT NULL,
            version TEXT NOT NULL,
            backend TEXT NOT NULL,
            served_name TEXT NOT NULL,
            adapter_path TEXT NOT NULL,
            fallback TEXT,
            updated_at REAL NOT NULL,
            actor TEXT NOT NULL DEFAULT ''
        )""")
    op.execute("""
        CREATE TABLE IF NOT EXISTS audit (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            at REAL NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            model TEXT,
            version TEXT,
            job_id TEXT,
            reason TEXT NOT NULL DEFAULT '',
            details TEXT NOT NULL DEFAULT '{}'
        )""")
    have = {c["name"] for c in sa.inspect(op.get_bind()).get_columns("jobs")}
    for column in ("evals_state", "evals"):
        if column not in have:
            op.execute(f"ALTER TABLE jobs ADD COLUMN {column} TEXT")


def downgrade() -> None:
    for table in ("audit", "deployments", "jobs"):
        op.execute(f"DROP TABLE IF EXISTS {table}")
