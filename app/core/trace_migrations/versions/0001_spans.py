"""Spans of the embedded trace store.

Revision ID: 0001
Revises: (none)
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
        CREATE TABLE IF NOT EXISTS spans (
            span_id TEXT PRIMARY KEY,
            trace_id TEXT NOT NULL,
            parent_id TEXT,
            name TEXT NOT NULL,
            kind TEXT NOT NULL,
            start_ns INTEGER NOT NULL,
            end_ns INTEGER NOT NULL,
            status TEXT NOT NULL,
            status_message TEXT,
            attributes TEXT NOT NULL,
            events TEXT NOT NULL,
            service TEXT NOT NULL DEFAULT '',
            response_id TEXT,
            request_id TEXT
        )""")
    op.execute("CREATE INDEX IF NOT EXISTS spans_trace ON spans (trace_id, start_ns)")
    op.execute("CREATE INDEX IF NOT EXISTS spans_start ON spans (start_ns)")
    op.execute("CREATE INDEX IF NOT EXISTS spans_response ON spans (response_id) WHERE response_id IS NOT NULL")


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS spans")
