"""The guardrail decisions move into the kernel's audit_events table (trail 'guardrails'); guardrail_audit goes.

Run after the kernel's audit migrations (app/core/audit_migrations), which create audit_events: the store
migrates the audit schema first. Rows keep their order and, in a database of their own, their ids (ids are
shifted past any already in audit_events). Per row: actor 'policy:<policy>', action the action, subject the
validator (kind 'validator', ref the registered name), request id, and in details the stage, policy version,
verdict, score, latency and window (where there is one). The downgrade puts them back.

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
    bind = op.get_bind()
    offset = bind.execute(sa.text(
        "SELECT max(coalesce((SELECT max(id) FROM audit_events), 0),"
        " coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'audit_events'), 0))")).scalar()
    op.execute(f"""
        INSERT INTO audit_events (id, trail, at, actor, action, subject_kind, subject, subject_ref, from_ref, to_ref,
                                  reason, details, request_id)
        SELECT id + {int(offset)}, 'guardrails', ts, 'policy:' || policy, action, 'validator', validator, registered,
               NULL, NULL, coalesce(reason, ''),
               CASE WHEN window IS NULL
                    THEN json_object('latency_ms', latency_ms, 'policy_version', policy_version, 'score', score,
                                     'stage', stage, 'verdict', verdict)
                    ELSE json_object('latency_ms', latency_ms, 'policy_version', policy_version, 'score', score,
                                     'stage', stage, 'verdict', verdict, 'window', window) END,
               request_id
        FROM guardrail_audit ORDER BY id""")
    op.execute("DROP TABLE guardrail_audit")


def downgrade() -> None:
    op.execute("""
        CREATE TABLE guardrail_audit (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            ts REAL NOT NULL,
            request_id TEXT NOT NULL,
            stage TEXT NOT NULL,
            policy TEXT NOT NULL,
            policy_version TEXT NOT NULL,
            validator TEXT NOT NULL,
            registered TEXT NOT NULL,
            verdict TEXT NOT NULL,
            action TEXT NOT NULL,
            score REAL,
            latency_ms REAL,
            reason TEXT,
            window INTEGER
        )""")
    op.execute("CREATE INDEX guardrail_audit_request ON guardrail_audit(request_id)")
    op.execute("CREATE INDEX guardrail_audit_ts ON guardrail_audit(ts)")
    op.execute("""
        INSERT INTO guardrail_audit (ts, request_id, stage, policy, policy_version, validator, registered, verdict,
                                     action, score, latency_ms, reason, window)
        SELECT at, coalesce(request_id, ''), coalesce(json_extract(details, '$.stage'), ''),
               CASE WHEN actor LIKE 'policy:%' THEN substr(actor, 8) ELSE actor END,
               coalesce(json_extract(details, '$.policy_version'), ''), subject, coalesce(subject_ref, ''),
               coalesce(json_extract(details, '$.verdict'), ''), action, json_extract(details, '$.score'),
               json_extract(details, '$.latency_ms'), reason, json_extract(details, '$.window')
        FROM audit_events WHERE trail = 'guardrails' ORDER BY id""")
    op.execute("DELETE FROM audit_events WHERE trail = 'guardrails'")
