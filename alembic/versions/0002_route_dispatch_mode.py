"""Routes get a dispatch mode (sync|async); existing routes stay sync.

Non-breaking: the column is added with a server default, so every existing row reads
'sync' and older writers that do not know the column keep working.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 21:05:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "routes",
        sa.Column("dispatch_mode", sa.Text(), server_default=sa.text("'sync'"), nullable=False),
    )
    op.create_check_constraint(
        op.f("ck_routes_dispatch_mode"), "routes", "dispatch_mode IN ('sync', 'async')"
    )


def downgrade() -> None:
    op.drop_constraint(op.f("ck_routes_dispatch_mode"), "routes", type_="check")
    op.drop_column("routes", "dispatch_mode")
