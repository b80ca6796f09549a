"""Scripts remember the data capabilities of the user who saved them.

A script runs as the user who registered its route or trigger. Anyone holding
``app_manage_scripts`` could rewrite it, though, and the new code then read and
wrote the app's data with the registrant's rights: a member without
``app_read_data`` read every key through the owner's route. Each version now
records which of ``app_read_data`` / ``app_write_data`` its author held, and its
executions get no more of them (like a setuid file losing the bit when written).
Scripts saved before this revision keep both, which is what they had.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28 08:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "scripts",
        sa.Column(
            "data_capabilities",
            postgresql.ARRAY(sa.Text()),
            server_default=sa.text("ARRAY['app_read_data', 'app_write_data']::text[]"),
            nullable=False,
        ),
    )
    op.create_check_constraint(
        op.f("ck_scripts_data_capabilities"),
        "scripts",
        "data_capabilities <@ ARRAY['app_read_data', 'app_write_data']::text[]",
    )


def downgrade() -> None:
    op.drop_constraint(op.f("ck_scripts_data_capabilities"), "scripts", type_="check")
    op.drop_column("scripts", "data_capabilities")
