"""Alembic's entry point for this folder: Keel runs it programmatically (app.core.migrate)."""

from app.core.migrate import run_env

run_env()
