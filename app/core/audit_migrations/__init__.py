"""Alembic migrations of the kernel's audit table, ``audit_events`` (app.core.audit), SQLite and Postgres.

Every store that keeps an audit trail runs them on its own database before its own migrations (see
``app.core.audit.ensure_schema_sqlite``); their version table is ``alembic_version_audit``, shared by the
stores of one database file, so the table is created once whichever store opens the file first."""
