"""Alembic migrations of eval runs, results and the response cache (evals.store).

They run when the store opens (``app.core.migrate``)."""
