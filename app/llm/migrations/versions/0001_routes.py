"""The routing table: one row per run-time model alias, and the table's revision counter.

Revision ID: 0001
Revises: (none)
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    real = "DOUBLE PRECISION" if op.get_bind().dialect.name == "postgresql" else "REAL"
    op.execute(f"""
        CREATE TABLE IF NOT EXISTS routes (
            alias TEXT PRIMARY KEY,
            spec TEXT NOT NULL,
            owner TEXT NOT NULL,
            actor TEXT NOT NULL DEFAULT '',
            revision BIGINT NOT NULL,
            updated_at {real} NOT NULL
        )""")
    op.execute("CREATE TABLE IF NOT EXISTS routing_revision (id INTEGER PRIMARY KEY CHECK (id = 1), "
               "revision BIGINT NOT NULL)")
    op.execute("INSERT INTO routing_revision (id, revision) VALUES (1, 0) ON CONFLICT (id) DO NOTHING")


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS routing_revision")
    op.execute("DROP TABLE IF EXISTS routes")
