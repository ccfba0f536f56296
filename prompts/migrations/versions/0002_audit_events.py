"""The prompt audit moves into the kernel's audit_events table (trail 'prompts'); prompt_audit goes.

Run after the kernel's audit migrations (app/core/audit_migrations), which create audit_events: the store
migrates the audit schema first. Rows keep their order and, in a database of their own, their ids (ids are
shifted past any already in audit_events, so the ``before_id`` of a client paging through still works there).
Per row: subject the template (kind 'prompt', ref the label), from/to the versions (as text), ``at`` unix
seconds (from the ISO text), details as they were. The downgrade puts them back.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_COLUMNS = ("id, trail, at, actor, action, subject_kind, subject, subject_ref, from_ref, to_ref, reason, details,"
            " request_id")


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        op.execute("SET LOCAL TimeZone = 'UTC'")  # an ISO text without an offset is UTC (utc_now always has one)
        # Other stores in this database (routing, jobs) append audit events meanwhile: no id may come between
        # reading the offset and moving the identity past the copied rows.
        op.execute("LOCK TABLE audit_events IN EXCLUSIVE MODE")
        offset = bind.execute(sa.text("SELECT coalesce(max(id), 0) FROM audit_events")).scalar()
        at = "extract(epoch FROM at::timestamptz)::double precision"
    else:
        offset = bind.execute(sa.text(
            "SELECT max(coalesce((SELECT max(id) FROM audit_events), 0),"
            " coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'audit_events'), 0))")).scalar()
        at = "coalesce(round((julianday(at) - 2440587.5) * 86400.0, 3), 0.0)"
    op.execute(f"""
        INSERT INTO audit_events ({_COLUMNS})
        SELECT id + {int(offset)}, 'prompts', {at}, actor, action, 'prompt', name, label,
               CAST(from_version AS TEXT), CAST(to_version AS TEXT), reason, details, NULL
        FROM prompt_audit ORDER BY id""")
    if bind.dialect.name == "postgresql":  # explicit ids: move the identity past them
        op.execute("SELECT setval(pg_get_serial_sequence('audit_events', 'id'),"
                   " coalesce((SELECT max(id) FROM audit_events), 0) + 1, false)")
    op.execute("DROP TABLE prompt_audit")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        id_column, json_type = "id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", "JSONB"
        at = """to_char(to_timestamp(at) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"+00:00"')"""
    else:
        id_column, json_type = "id INTEGER PRIMARY KEY AUTOINCREMENT", "TEXT"
        at = "strftime('%Y-%m-%dT%H:%M:%f+00:00', at, 'unixepoch')"
    op.execute(f"""
        CREATE TABLE prompt_audit (
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
    op.execute("CREATE INDEX prompt_audit_name ON prompt_audit(name, label, id)")
    op.execute(f"""
        INSERT INTO prompt_audit (at, actor, action, name, label, from_version, to_version, reason, details)
        SELECT {at}, actor, action, subject, subject_ref, CAST(from_ref AS INTEGER), CAST(to_ref AS INTEGER),
               reason, details
        FROM audit_events WHERE trail = 'prompts' ORDER BY id""")
    op.execute("DELETE FROM audit_events WHERE trail = 'prompts'")
