"""Periodic tasks that one process of all those on this store runs per round (the scheduled drift check).

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    real = "DOUBLE PRECISION" if op.get_bind().dialect.name == "postgresql" else "REAL"
    op.execute(f"CREATE TABLE IF NOT EXISTS lineage_schedule (name TEXT PRIMARY KEY, last_at {real} NOT NULL)")


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS lineage_schedule")
