"""Stored responses (the OpenAI Responses API): each response, its owner and the conversation it ends.

Revision ID: 0001
Revises: (none)
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    # unix times: Postgres INTEGER is 4 bytes (2038); SQLite's grows to 8 on its own
    big = "BIGINT" if op.get_bind().dialect.name == "postgresql" else "INTEGER"
    op.execute(f"""
        CREATE TABLE IF NOT EXISTS responses (
            id TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            created_at {big} NOT NULL,
            previous_id TEXT,
            conversation TEXT NOT NULL,
            response TEXT NOT NULL
        )""")
    op.execute("CREATE INDEX IF NOT EXISTS responses_owner ON responses (owner, created_at)")


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS responses")
