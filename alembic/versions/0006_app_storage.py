"""Apps' stored bytes: ``app_storage`` and the deltas writes append to it.

Nothing bounded how much an app stores; one script writing large values in a loop
filled the disk and stopped PostgreSQL for every app. Each KV/document write now
appends its size change to ``app_storage_deltas`` (appends never conflict, so
concurrent writers of one app do not serialize on a counter row) and a task on
each node folds them into ``app_storage``, against which the storage quota is
checked. This revision fills ``app_storage`` from the data already stored, with
the definition of ``manager_core.postgres.storage``: a KV entry counts
``octet_length(key) + octet_length(value::text)``, a document
``octet_length(collection) + octet_length(id) + octet_length(data::text)``.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28 11:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "app_storage",
        sa.Column("app_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["app_id"],
            ["apps.id"],
            name=op.f("fk_app_storage_app_id_apps"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("app_id", name=op.f("pk_app_storage")),
    )
    op.create_table(
        "app_storage_deltas",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("app_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["app_id"],
            ["apps.id"],
            name=op.f("fk_app_storage_deltas_app_id_apps"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_app_storage_deltas")),
    )
    op.create_index("ix_app_storage_deltas_app_id", "app_storage_deltas", ["app_id"], unique=False)
    op.execute(
        """
        INSERT INTO app_storage (app_id, bytes)
        SELECT apps.id, COALESCE(kv.bytes, 0) + COALESCE(docs.bytes, 0)
        FROM apps
        LEFT JOIN (
            SELECT app_id, sum(octet_length(key) + octet_length(value::text)) AS bytes
            FROM kv_entries GROUP BY app_id
        ) kv ON kv.app_id = apps.id
        LEFT JOIN (
            SELECT app_id,
                   sum(octet_length(collection) + octet_length(id)
                       + octet_length(data::text)) AS bytes
            FROM documents GROUP BY app_id
        ) docs ON docs.app_id = apps.id
        """
    )


def downgrade() -> None:
    op.drop_index("ix_app_storage_deltas_app_id", table_name="app_storage_deltas")
    op.drop_table("app_storage_deltas")
    op.drop_table("app_storage")
