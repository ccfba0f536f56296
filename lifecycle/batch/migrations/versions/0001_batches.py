"""Files and batches (the OpenAI Batch API): uploaded files, batches, and each request line's outcome.

Revision ID: 0001
Revises: (none)
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    # unix times and byte counts: Postgres INTEGER is 4 bytes (2038, 2 GiB); SQLite's grows to 8 on its own
    big = "BIGINT" if op.get_bind().dialect.name == "postgresql" else "INTEGER"
    op.execute(f"""
        CREATE TABLE IF NOT EXISTS files (
            id TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            filename TEXT NOT NULL,
            purpose TEXT NOT NULL,
            bytes {big} NOT NULL,
            created_at {big} NOT NULL,
            path TEXT NOT NULL
        )""")
    op.execute("CREATE INDEX IF NOT EXISTS files_owner ON files (owner, created_at)")
    op.execute(f"""
        CREATE TABLE IF NOT EXISTS batches (
            id TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            status TEXT NOT NULL,
            created_at {big} NOT NULL,
            job_id TEXT,
            batch TEXT NOT NULL
        )""")
    op.execute("CREATE INDEX IF NOT EXISTS batches_owner ON batches (owner, created_at)")
    op.execute("""
        CREATE TABLE IF NOT EXISTS batch_results (
            batch_id TEXT NOT NULL,
            line INTEGER NOT NULL,
            custom_id TEXT,
            ok INTEGER NOT NULL,
            record TEXT NOT NULL,
            PRIMARY KEY (batch_id, line)
        )""")


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS batch_results")
    op.execute("DROP TABLE IF EXISTS batches")
    op.execute("DROP TABLE IF EXISTS files")
