"""Lineage records: one JSON document per chat completion id.

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
        CREATE TABLE IF NOT EXISTS lineage (
            id TEXT PRIMARY KEY,
            request_id TEXT NOT NULL DEFAULT '',
            created REAL NOT NULL,
            owner TEXT NOT NULL DEFAULT '',
            record TEXT NOT NULL
        )""")
    op.execute("CREATE INDEX IF NOT EXISTS lineage_created ON lineage (created)")
    op.execute("CREATE INDEX IF NOT EXISTS lineage_request ON lineage (request_id)")


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS lineage")
