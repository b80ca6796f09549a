"""The outbox's due index leads with the app: claims share a batch between apps.

A claim used to take the oldest due rows of the whole outbox, so one app's
backlog held up every other app's executions until it drained. A claim now walks
the due rows app by app (``ix_outbox_app_due``: one probe per app, however many
rows each has) and gives each app with rows due an equal share of its batch.
``ix_outbox_due`` (``run_at, id``) served only the old claim.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28 08:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_outbox_app_due",
        "outbox",
        ["app_id", "run_at", "id"],
        unique=False,
        postgresql_where=sa.text("claimed_until IS NULL"),
    )
    op.drop_index("ix_outbox_due", table_name="outbox")


def downgrade() -> None:
    op.create_index(
        "ix_outbox_due",
        "outbox",
        ["run_at", "id"],
        unique=False,
        postgresql_where=sa.text("claimed_until IS NULL"),
    )
    op.drop_index("ix_outbox_app_due", table_name="outbox")
