"""Rate-limit buckets: one row per API key, so that every API process on one database counts the same requests.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
        CREATE TABLE IF NOT EXISTS rate_buckets (
            key_id TEXT PRIMARY KEY,
            tokens DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL,
            last_allowed BOOLEAN NOT NULL DEFAULT TRUE
        )""")


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS rate_buckets")
