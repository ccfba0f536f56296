"""Baseline: the ingest snapshot tables as the release before Alembic created them (existing ones are kept).

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
        CREATE TABLE IF NOT EXISTS rag_snapshots (
            id TEXT PRIMARY KEY,
            collection TEXT NOT NULL,
            status TEXT NOT NULL,
            started_at TEXT NOT NULL,
            finished_at TEXT,
            embedding_model TEXT NOT NULL,
            sparse_encoder TEXT NOT NULL,
            chunker_config TEXT NOT NULL,
            paths TEXT NOT NULL,
            prune INTEGER NOT NULL,
            counts TEXT NOT NULL DEFAULT '{}',
            rejections TEXT NOT NULL DEFAULT '[]',
            error TEXT
        )""")
    op.execute("CREATE INDEX IF NOT EXISTS rag_snapshots_collection ON rag_snapshots(collection, started_at)")
    op.execute("""
        CREATE TABLE IF NOT EXISTS rag_snapshot_files (
            snapshot_id TEXT NOT NULL REFERENCES rag_snapshots(id) ON DELETE CASCADE,
            doc_id TEXT NOT NULL,
            source TEXT NOT NULL,
            source_sha256 TEXT NOT NULL,
            version TEXT NOT NULL,
            chunks INTEGER NOT NULL,
            PRIMARY KEY (snapshot_id, doc_id)
        )""")


def downgrade() -> None:
    for table in ("rag_snapshot_files", "rag_snapshots"):
        op.execute(f"DROP TABLE IF EXISTS {table}")
