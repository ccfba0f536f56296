"""Alembic migrations of fine-tuning jobs, deployments and their audit (finetune.jobs).

They run when the store opens (``app.core.migrate``)."""
