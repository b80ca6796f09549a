"""Executions and dead letters keep the script's traceback: ``error_traceback``.

The executor hands back, for an uncaught exception, the script's own traceback (its
frames only, no host paths, at most ``MAX_TRACEBACK_CHARS`` of its end), but only the
error's kind and message were stored, so the admin API showed no line number. Both
tables get a nullable ``error_traceback``; rows written before read NULL, as do
errors without one (a rejection, a timeout, a platform error).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-28 20:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("executions", sa.Column("error_traceback", sa.Text(), nullable=True))
    op.add_column("dead_letters", sa.Column("error_traceback", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("dead_letters", "error_traceback")
    op.drop_column("executions", "error_traceback")
