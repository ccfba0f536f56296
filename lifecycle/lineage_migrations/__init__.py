"""Alembic migrations of the lineage store (lifecycle.lineage); run on open."""
