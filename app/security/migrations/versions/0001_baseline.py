"""Baseline: the api_keys table as the release before Alembic created it (an existing one is kept).

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
        CREATE TABLE IF NOT EXISTS api_keys (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            key_hash TEXT NOT NULL UNIQUE,
            scopes TEXT NOT NULL,
            rate_limit_per_minute INTEGER,
            created_at TEXT NOT NULL,
            revoked_at TEXT
        )""")


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS api_keys")
