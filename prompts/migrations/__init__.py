"""Alembic migrations of the prompt registry (prompts.store, prompts.store_pg), SQLite and Postgres.

They run when the store opens (``app.core.migrate``)."""
