"""Alembic migrations of the job queue (app.jobs.queue), SQLite and Postgres. They run when the queue opens."""
