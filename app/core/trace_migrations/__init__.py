"""Alembic migrations of the embedded trace store (app.core.tracing); run on open."""
