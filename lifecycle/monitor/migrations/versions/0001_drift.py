"""Drift check results: one row per check, the whole result as JSON.

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
    op.execute(f"""
        CREATE TABLE IF NOT EXISTS drift_checks (
            id TEXT PRIMARY KEY,
            created {real} NOT NULL,
            actor TEXT NOT NULL DEFAULT '',
            verdict TEXT NOT NULL,
            drift_share {real},
            reference_kind TEXT NOT NULL,
            current_rows INTEGER NOT NULL,
            reference_rows INTEGER NOT NULL,
            result TEXT NOT NULL
        )""")
    op.execute("CREATE INDEX IF NOT EXISTS drift_checks_created ON drift_checks (created)")


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS drift_checks")
