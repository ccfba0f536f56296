"""A key's own limit of model tokens (prompt + completion) per minute; NULL: the server's default (or none).

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE api_keys ADD COLUMN tokens_per_minute INTEGER")


def downgrade() -> None:
    op.execute("ALTER TABLE api_keys DROP COLUMN tokens_per_minute")
