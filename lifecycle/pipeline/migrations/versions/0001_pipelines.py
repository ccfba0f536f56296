"""Continuous-training pipelines: the definitions seen, their runs and each run's steps.

Revision ID: 0001
Revises: (none)
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    # unix times: Postgres REAL is 4 bytes (about 2 minutes apart today); SQLite's REAL is already 8
    real = "DOUBLE PRECISION" if op.get_bind().dialect.name == "postgresql" else "REAL"
    # armed_at: when this home first saw the pipeline; its triggers only count what happened after.
    op.execute(f"""
        CREATE TABLE IF NOT EXISTS pipelines (
            name TEXT PRIMARY KEY,
            armed_at {real} NOT NULL
        )""")
    op.execute(f"""
        CREATE TABLE IF NOT EXISTS pipeline_runs (
            id TEXT PRIMARY KEY,
            pipeline TEXT NOT NULL,
            model TEXT NOT NULL,
            state TEXT NOT NULL,
            outcome TEXT,
            open INTEGER NOT NULL,
            trigger TEXT NOT NULL,
            definition TEXT NOT NULL,
            definition_hash TEXT NOT NULL,
            created_by TEXT NOT NULL,
            created_at {real} NOT NULL,
            updated_at {real} NOT NULL,
            finished_at {real},
            job_id TEXT,
            decision TEXT,
            error TEXT
        )""")
    # One open run per pipeline, whichever process starts it: the second insert fails.
    op.execute("CREATE UNIQUE INDEX IF NOT EXISTS pipeline_runs_one_open ON pipeline_runs (pipeline) WHERE open = 1")
    op.execute("CREATE INDEX IF NOT EXISTS pipeline_runs_by_pipeline ON pipeline_runs (pipeline, created_at)")
    op.execute(f"""
        CREATE TABLE IF NOT EXISTS pipeline_steps (
            run_id TEXT NOT NULL,
            step TEXT NOT NULL,
            position INTEGER NOT NULL,
            state TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            started_at {real},
            finished_at {real},
            artifacts TEXT NOT NULL DEFAULT '{{}}',
            error TEXT,
            log TEXT NOT NULL DEFAULT '',
            PRIMARY KEY (run_id, step)
        )""")


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS pipeline_steps")
    op.execute("DROP TABLE IF EXISTS pipeline_runs")
    op.execute("DROP TABLE IF EXISTS pipelines")
