"""Alembic migrations of API keys (app.security.keys).

They run when the store opens (``app.core.migrate``)."""
