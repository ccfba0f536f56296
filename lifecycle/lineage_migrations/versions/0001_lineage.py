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
    pg = op.get_bind().dialect.name == "postgresql"  # new there: no earlier release wrote it
    real = "DOUBLE PRECISION" if pg else "REAL"  # Postgres's REAL is 4 bytes: not enough for a unix time
    blob = "BYTEA" if pg else "BLOB"
    op.execute(f"""
        CREATE TABLE IF NOT EXISTS lineage (
            id TEXT PRIMARY KEY,
            request_id TEXT NOT NULL DEFAULT '',
            created {real} NOT NULL,
            owner TEXT NOT NULL DEFAULT '',
            record TEXT NOT NULL
        )""")
    op.execute("CREATE INDEX IF NOT EXISTS lineage_created ON lineage (created)")
    op.execute("CREATE INDEX IF NOT EXISTS lineage_request ON lineage (request_id)")
    # what the drift monitor compares (lifecycle.lineage.Features): no text, the question as an embedding
    op.execute(f"""
        CREATE TABLE IF NOT EXISTS features (
            id TEXT PRIMARY KEY,
            at {real} NOT NULL,
            owner TEXT NOT NULL DEFAULT '',
            model TEXT NOT NULL DEFAULT '',
            release TEXT,
            variant TEXT,
            question_chars INTEGER NOT NULL,
            input_chars INTEGER NOT NULL,
            answer_chars INTEGER NOT NULL,
            prompt_tokens INTEGER NOT NULL,
            completion_tokens INTEGER NOT NULL,
            top_score {real},
            grounded INTEGER NOT NULL,
            refused INTEGER NOT NULL,
            validators TEXT NOT NULL DEFAULT '',
            outcome TEXT NOT NULL,
            embedding {blob}
        )""")
    op.execute("CREATE INDEX IF NOT EXISTS features_at ON features (at)")
    op.execute("CREATE INDEX IF NOT EXISTS features_release ON features (release, variant, at)")


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS features")
    op.execute("DROP TABLE IF EXISTS lineage")
