"""Alembic migrations of the release store (lifecycle.releases.store), SQLite and Postgres; run on open."""
