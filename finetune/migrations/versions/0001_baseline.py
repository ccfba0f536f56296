"""Baseline: the fine-tuning tables as the release before Alembic created them (existing ones are kept).

A jobs table of the first release, before adapter evaluation, gets the ``evals_state`` and ``evals``
columns (what the hand-kept ALTER TABLE list of that release added). On Postgres (``finetune.url``), where
no release before kept the store, the same tables with 8-byte times and without the old audit table.

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
    postgres = op.get_bind().dialect.name == "postgresql"
    # Unix times: Postgres REAL is 4 bytes (about 2 minutes apart at today's epoch); SQLite keeps the word the
    # release before Alembic wrote (both are 8-byte floats there).
    time_type = "DOUBLE PRECISION" if postgres else "REAL"
    op.execute(f"""
        CREATE TABLE IF NOT EXISTS jobs (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            state TEXT NOT NULL,
            spec_yaml TEXT NOT NULL,
            spec_hash TEXT NOT NULL,
            submitted_by TEXT NOT NULL DEFAULT '',
            created_at {time_type} NOT NULL,
            started_at {time_type},
            finished_at {time_type},
            updated_at {time_type} NOT NULL,
            step INTEGER NOT NULL DEFAULT 0,
            max_steps INTEGER NOT NULL DEFAULT 0,
            attempts INTEGER NOT NULL DEFAULT 0,
            worker TEXT,
            heartbeat_at {time_type},
            cancel_requested INTEGER NOT NULL DEFAULT 0,
            error TEXT,
            error_code TEXT,
            metrics TEXT NOT NULL DEFAULT '{{}}',
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
    have = {c["name"] for c in sa.inspect(op.get_bind()).get_columns("jobs")}
    if "spec_yaml" not in have:  # a table of that name that is not this store's (MLflow has one)
        raise RuntimeError("the database already has a table named jobs that is not Keel's fine-tuning jobs "
                           "(MLflow's?): give the fine-tuning store a database of its own (finetune.url)")
    op.execute("CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, created_at)")
    op.execute(f"""
        CREATE TABLE IF NOT EXISTS deployments (
            alias TEXT PRIMARY KEY,
            model TEXT NOT NULL,
            version TEXT NOT NULL,
            backend TEXT NOT NULL,
            served_name TEXT NOT NULL,
            adapter_path TEXT NOT NULL,
            fallback TEXT,
            updated_at {time_type} NOT NULL,
            actor TEXT NOT NULL DEFAULT ''
        )""")
    # The audit table of the SQLite release before the kernel's audit_events, which 0002 moves into that. On
    # Postgres the store began with audit_events: there was never one to move.
    if not postgres:
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
    for column in ("evals_state", "evals"):
        if column not in have:
            op.execute(f"ALTER TABLE jobs ADD COLUMN {column} TEXT")


def downgrade() -> None:
    for table in ("audit", "deployments", "jobs"):
        op.execute(f"DROP TABLE IF EXISTS {table}")
