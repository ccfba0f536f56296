"""Alembic migrations of the routing table (app.llm.routing), SQLite and Postgres. They run when the store opens."""
