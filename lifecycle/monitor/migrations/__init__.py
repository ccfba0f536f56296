"""Alembic migrations of the drift monitor's store (lifecycle.monitor.store); run on open."""
