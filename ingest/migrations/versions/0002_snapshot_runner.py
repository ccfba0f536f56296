"""Who runs a snapshot and when it last made progress, so that a process finding a 'running' snapshot can tell
one whose process died (failed) from one another process is still writing (left alone): with the snapshots in
Postgres, several API processes ingest into the same collections.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE rag_snapshots ADD COLUMN runner TEXT")
    op.execute("ALTER TABLE rag_snapshots ADD COLUMN beat_at DOUBLE PRECISION")


def downgrade() -> None:
    with op.batch_alter_table("rag_snapshots") as batch:
        batch.drop_column("beat_at")
        batch.drop_column("runner")
