"""Alembic migrations of the ingest snapshots manifest (ingest.manifest).

They run when the store opens (``app.core.migrate``)."""
