"""Executions lose their (app_id, status) index.

The admin API lists an app's executions newest first through
``ix_executions_app_id_created_at_id`` (status is a filter on that scan), so
``(app_id, status)`` served no query, but it made every status change (queued →
running → final) add an entry to every index of ``executions``, because an indexed
column changed. Without it, status updates can be heap-only (HOT) updates.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 00:55:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index(op.f("ix_executions_app_id_status"), table_name="executions")


def downgrade() -> None:
    op.create_index(op.f("ix_executions_app_id_status"), "executions", ["app_id", "status"])
