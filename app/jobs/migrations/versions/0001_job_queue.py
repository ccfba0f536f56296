"""The job queue: one row per job, its state, lease, progress and outcome.

Revision ID: 0001
Revises: (none)
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    real = "DOUBLE PRECISION" if postgres else "REAL"
    js = "JSONB" if postgres else "TEXT"
    op.execute(f"""
        CREATE TABLE IF NOT EXISTS job_queue (
            id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            owner TEXT NOT NULL DEFAULT '',
            payload {js} NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
            attempts INTEGER NOT NULL DEFAULT 0,
            max_attempts INTEGER NOT NULL,
            run_after {real} NOT NULL,
            progress {js},
            result {js},
            error {js},
            idempotency_key TEXT,
            cancel_requested INTEGER NOT NULL DEFAULT 0,
            claimed_by TEXT,
            heartbeat_at {real},
            created_at {real} NOT NULL,
            started_at {real},
            finished_at {real},
            updated_at {real} NOT NULL
        )""")
    # NULL keys never collide (SQLite and Postgres alike): only jobs enqueued with a key are deduplicated.
    op.execute("CREATE UNIQUE INDEX IF NOT EXISTS job_queue_idempotency ON job_queue (owner, idempotency_key)")
    op.execute("CREATE INDEX IF NOT EXISTS job_queue_claim ON job_queue (state, kind, created_at)")
    op.execute("CREATE INDEX IF NOT EXISTS job_queue_owner ON job_queue (owner, created_at)")
    op.execute("CREATE INDEX IF NOT EXISTS job_queue_created ON job_queue (created_at)")


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS job_queue")
