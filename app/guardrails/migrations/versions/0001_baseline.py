"""Baseline: the guardrail_audit table as the release before Alembic created it (an existing one is kept).

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
        CREATE TABLE IF NOT EXISTS guardrail_audit (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            ts REAL NOT NULL,
            request_id TEXT NOT NULL,
            stage TEXT NOT NULL,
            policy TEXT NOT NULL,
            policy_version TEXT NOT NULL,
            validator TEXT NOT NULL,
            registered TEXT NOT NULL,
            verdict TEXT NOT NULL,
            action TEXT NOT NULL,
            score REAL,
            latency_ms REAL,
            reason TEXT,
            window INTEGER
        )""")
    op.execute("CREATE INDEX IF NOT EXISTS guardrail_audit_request ON guardrail_audit(request_id)")
    op.execute("CREATE INDEX IF NOT EXISTS guardrail_audit_ts ON guardrail_audit(ts)")


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS guardrail_audit")
