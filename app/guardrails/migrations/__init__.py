"""Alembic migrations of the guardrail audit trail (app.guardrails.audit).

They run when the store opens (``app.core.migrate``)."""
