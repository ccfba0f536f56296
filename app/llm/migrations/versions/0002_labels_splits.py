"""Labels and splits in the routing table, beside the model aliases, under the same revision counter and audit
trail: which version a named label of a versioned artifact (a prompt template) serves, and how a release endpoint
splits its traffic between the variants of its release.

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
    op.execute(f"""
        CREATE TABLE IF NOT EXISTS route_labels (
            kind TEXT NOT NULL,
            subject TEXT NOT NULL,
            label TEXT NOT NULL,
            version BIGINT NOT NULL,
            ref TEXT NOT NULL DEFAULT '',
            actor TEXT NOT NULL DEFAULT '',
            revision BIGINT NOT NULL,
            updated_at {real} NOT NULL,
            PRIMARY KEY (kind, subject, label)
        )""")
    op.execute(f"""
        CREATE TABLE IF NOT EXISTS route_splits (
            endpoint TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            release_id BIGINT NOT NULL,
            release_revision BIGINT NOT NULL,
            weights TEXT NOT NULL,
            actor TEXT NOT NULL DEFAULT '',
            revision BIGINT NOT NULL,
            updated_at {real} NOT NULL
        )""")


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS route_splits")
    op.execute("DROP TABLE IF EXISTS route_labels")
