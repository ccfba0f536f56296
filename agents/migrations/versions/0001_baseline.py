"""Baseline: the agent_runs table as the release before Alembic created it, on SQLite and Postgres.

A table of the first release, before the ``guardrails`` column, gets the column; an existing table and
its rows are kept. In Postgres, times are epoch seconds as DOUBLE PRECISION (SQLite: REAL) and JSON is
text, so one row decoder serves both.

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
    real = "DOUBLE PRECISION" if op.get_bind().dialect.name == "postgresql" else "REAL"
    op.execute(f"""
        CREATE TABLE IF NOT EXISTS agent_runs (
            run_id TEXT PRIMARY KEY,
            thread_id TEXT NOT NULL,
            workflow TEXT NOT NULL,
            owner TEXT,
            namespace TEXT NOT NULL DEFAULT '[]',
            status TEXT NOT NULL,
            question TEXT NOT NULL DEFAULT '',
            answer TEXT,
            citations TEXT NOT NULL DEFAULT '[]',
            error TEXT,
            pending TEXT,
            steps TEXT NOT NULL DEFAULT '[]',
            guardrails TEXT,
            created_at {real} NOT NULL,
            updated_at {real} NOT NULL,
            finished_at {real}
        )""")
    op.execute("CREATE INDEX IF NOT EXISTS agent_runs_thread ON agent_runs(thread_id, created_at)")
    op.execute("CREATE INDEX IF NOT EXISTS agent_runs_status ON agent_runs(status, created_at)")
    have = {c["name"] for c in sa.inspect(op.get_bind()).get_columns("agent_runs")}
    if "guardrails" not in have:
        op.execute("ALTER TABLE agent_runs ADD COLUMN guardrails TEXT")


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS agent_runs")
