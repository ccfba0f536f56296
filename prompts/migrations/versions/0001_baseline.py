"""Baseline: the prompt registry's tables as the release before Alembic created them, on SQLite and Postgres.

Existing tables and rows are kept (the revision counter too). The dialects differ only in the audit id
(SQLite AUTOINCREMENT, Postgres identity) and the audit details type (TEXT, JSONB).

Revision ID: 0001
Revises: (none)
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        id_column, json_type = "id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", "JSONB"
    else:
        id_column, json_type = "id INTEGER PRIMARY KEY AUTOINCREMENT", "TEXT"
    op.execute("""
        CREATE TABLE IF NOT EXISTS prompt_templates (
            name TEXT PRIMARY KEY,
            latest_version INTEGER NOT NULL,
            description TEXT NOT NULL DEFAULT '',
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL)""")
    op.execute("""
        CREATE TABLE IF NOT EXISTS prompt_versions (
            name TEXT NOT NULL REFERENCES prompt_templates(name),
            version INTEGER NOT NULL,
            content TEXT NOT NULL,
            hash TEXT NOT NULL,
            parent INTEGER,
            author TEXT NOT NULL,
            message TEXT NOT NULL,
            created_at TEXT NOT NULL,
            PRIMARY KEY (name, version))""")
    op.execute("""
        CREATE TABLE IF NOT EXISTS prompt_labels (
            name TEXT NOT NULL REFERENCES prompt_templates(name),
            label TEXT NOT NULL,
            version INTEGER NOT NULL,
            updated_at TEXT NOT NULL,
            updated_by TEXT NOT NULL,
            PRIMARY KEY (name, label))""")
    op.execute(f"""
        CREATE TABLE IF NOT EXISTS prompt_audit (
            {id_column},
            at TEXT NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            name TEXT NOT NULL,
            label TEXT,
            from_version INTEGER,
            to_version INTEGER,
            reason TEXT NOT NULL DEFAULT '',
            details {json_type} NOT NULL DEFAULT '{{}}')""")
    op.execute("CREATE INDEX IF NOT EXISTS prompt_audit_name ON prompt_audit(name, label, id)")
    op.execute("CREATE TABLE IF NOT EXISTS prompt_meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL)")
    op.execute("INSERT INTO prompt_meta VALUES ('revision', 0) ON CONFLICT DO NOTHING")


def downgrade() -> None:
    for table in ("prompt_meta", "prompt_audit", "prompt_labels", "prompt_versions", "prompt_templates"):
        op.execute(f"DROP TABLE IF EXISTS {table}")
