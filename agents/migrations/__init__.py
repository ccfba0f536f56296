"""Alembic migrations of the agent runs table (agents.runs), SQLite and Postgres.

They run when the store opens (``app.core.migrate``)."""
