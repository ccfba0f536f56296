"""Releases, what each variant served, user feedback, online judge scores and shadow answers.

Revision ID: 0001
Revises: (none)
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    pg = op.get_bind().dialect.name == "postgresql"
    real = "DOUBLE PRECISION" if pg else "REAL"
    serial = "BIGSERIAL PRIMARY KEY" if pg else "INTEGER PRIMARY KEY AUTOINCREMENT"
    op.execute(f"""
        CREATE TABLE IF NOT EXISTS releases (
            id {serial},
            name TEXT NOT NULL,
            spec TEXT NOT NULL,
            spec_hash TEXT NOT NULL,
            status TEXT NOT NULL,
            weights TEXT NOT NULL,
            step INTEGER NOT NULL DEFAULT 0,
            step_started_at {real} NOT NULL,
            decision TEXT,
            note TEXT,
            created_by TEXT NOT NULL DEFAULT '',
            created_at {real} NOT NULL,
            updated_at {real} NOT NULL,
            revision BIGINT NOT NULL DEFAULT 1,
            current INTEGER NOT NULL DEFAULT 1
        )""")
    # one current release per endpoint name: two creates racing cannot both win
    op.execute("CREATE UNIQUE INDEX IF NOT EXISTS releases_current_name ON releases (name) WHERE current = 1")
    op.execute("CREATE TABLE IF NOT EXISTS releases_revision (id INTEGER PRIMARY KEY CHECK (id = 1), "
               "revision BIGINT NOT NULL)")
    op.execute("INSERT INTO releases_revision (id, revision) VALUES (1, 0) ON CONFLICT (id) DO NOTHING")
    op.execute(f"""
        CREATE TABLE IF NOT EXISTS release_observations (
            id {serial},
            release_id BIGINT NOT NULL,
            variant TEXT NOT NULL,
            at {real} NOT NULL,
            response_id TEXT NOT NULL,
            owner TEXT NOT NULL DEFAULT '',
            unit TEXT NOT NULL DEFAULT '',
            error INTEGER NOT NULL DEFAULT 0,
            blocked INTEGER NOT NULL DEFAULT 0,
            redacted INTEGER NOT NULL DEFAULT 0,
            latency_ms {real} NOT NULL,
            ttft_ms {real},
            prompt_tokens INTEGER NOT NULL DEFAULT 0,
            completion_tokens INTEGER NOT NULL DEFAULT 0
        )""")
    op.execute("CREATE INDEX IF NOT EXISTS release_observations_release ON release_observations "
               "(release_id, variant, at)")
    op.execute("CREATE INDEX IF NOT EXISTS release_observations_response ON release_observations (response_id)")
    op.execute(f"""
        CREATE TABLE IF NOT EXISTS feedback (
            response_id TEXT NOT NULL,
            owner TEXT NOT NULL,
            at {real} NOT NULL,
            score {real} NOT NULL,
            comment TEXT NOT NULL DEFAULT '',
            PRIMARY KEY (response_id, owner)
        )""")
    op.execute(f"""
        CREATE TABLE IF NOT EXISTS judge_scores (
            id {serial},
            release_id BIGINT NOT NULL,
            variant TEXT NOT NULL,
            at {real} NOT NULL,
            response_id TEXT NOT NULL,
            metric TEXT NOT NULL,
            score {real} NOT NULL
        )""")
    op.execute("CREATE INDEX IF NOT EXISTS judge_scores_release ON judge_scores (release_id, variant)")
    op.execute(f"""
        CREATE TABLE IF NOT EXISTS shadow_pairs (
            id {serial},
            release_id BIGINT NOT NULL,
            variant TEXT NOT NULL,
            at {real} NOT NULL,
            response_id TEXT NOT NULL,
            question TEXT NOT NULL DEFAULT '',
            primary_text TEXT NOT NULL DEFAULT '',
            shadow_text TEXT NOT NULL DEFAULT '',
            similarity {real},
            primary_latency_ms {real},
            shadow_latency_ms {real},
            primary_tokens INTEGER NOT NULL DEFAULT 0,
            shadow_tokens INTEGER NOT NULL DEFAULT 0,
            primary_blocked INTEGER NOT NULL DEFAULT 0,
            shadow_blocked INTEGER NOT NULL DEFAULT 0,
            shadow_error TEXT
        )""")
    op.execute("CREATE INDEX IF NOT EXISTS shadow_pairs_release ON shadow_pairs (release_id, at)")


def downgrade() -> None:
    for table in ("shadow_pairs", "judge_scores", "feedback", "release_observations", "releases_revision", "releases"):
        op.execute(f"DROP TABLE IF EXISTS {table}")
