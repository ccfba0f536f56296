"""The bytes of files kept in the database: with the batch store in Postgres (``batch.url`` or ``database_url``),
every API process reads every upload and result file, not only the one whose disk received it. Unused on SQLite
(the bytes stay under ``<home>/files/``).

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    blob = "BYTEA" if op.get_bind().dialect.name == "postgresql" else "BLOB"
    op.execute(f"""
        CREATE TABLE IF NOT EXISTS file_chunks (
            file_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            data {blob} NOT NULL,
            PRIMARY KEY (file_id, seq)
        )""")


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS file_chunks")
