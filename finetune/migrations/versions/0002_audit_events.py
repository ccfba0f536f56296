"""The fine-tuning audit moves into the kernel's audit_events table (trail 'adapters'); the audit table goes.

Run after the kernel's audit migrations (app/core/audit_migrations), which create audit_events: the store
migrates the audit schema first. Rows keep their order and, in a database of their own, their ids (shifted past
any already in audit_events). Per row: subject the adapter (kind 'adapter', name the model) or, without a model,
the job (kind 'job'); subject_ref the job id; to_ref the version; from_ref the version it replaced where the
details say ("from"); details as they were. The downgrade puts them back.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        return
    offset = op.get_bind().execute(sa.text(
        "SELECT max(coalesce((SELECT max(id) FROM audit_events), 0),"
        " coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'audit_events'), 0))")).scalar()
    op.execute(f"""
        INSERT INTO audit_events (id, trail, at, actor, action, subject_kind, subject, subject_ref, from_ref, to_ref,
                                  reason, details, request_id)
        SELECT id + {int(offset)}, 'adapters', at, actor, action,
               CASE WHEN coalesce(model, '') != '' THEN 'adapter' ELSE 'job' END,
               CASE WHEN coalesce(model, '') != '' THEN model ELSE coalesce(job_id, '') END,
               job_id,
               CASE WHEN json_valid(details) AND json_type(details, '$.from') IN ('text', 'integer')
                    THEN CAST(json_extract(details, '$.from') AS TEXT) END,
               version, reason, CASE WHEN json_valid(details) THEN details ELSE '{{}}' END, NULL
        FROM audit ORDER BY id""")
    op.execute("DROP TABLE audit")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        return
    op.execute("""
        CREATE TABLE audit (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            at REAL NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            model TEXT,
            version TEXT,
            job_id TEXT,
            reason TEXT NOT NULL DEFAULT '',
            details TEXT NOT NULL DEFAULT '{}'
        )""")
    op.execute("""
        INSERT INTO audit (at, actor, action, model, version, job_id, reason, details)
        SELECT at, actor, action, CASE WHEN subject_kind = 'adapter' THEN subject END, to_ref, subject_ref, reason,
               details
        FROM audit_events WHERE trail = 'adapters' ORDER BY id""")
    op.execute("DELETE FROM audit_events WHERE trail = 'adapters'")
