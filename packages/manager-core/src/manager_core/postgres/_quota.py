"""Per-app quotas on configuration rows (``MAX_ROUTES_PER_APP``, ...)."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from manager_core import tables as t
from picloud_shared.errors import LimitExceeded
from picloud_shared.ids import AppId


async def lock_app(c: AsyncConnection, app_id: AppId) -> None:
    """Serialise changes to what the app holds, for this transaction:
    ``FOR NO KEY UPDATE`` of the app row, which rows inserted for the app (their
    foreign key takes ``FOR KEY SHARE``) do not wait for."""
    await c.execute(
        sa.select(t.apps.c.id).where(t.apps.c.id == app_id).with_for_update(key_share=True)
    )


async def check_quota(
    c: AsyncConnection, table: sa.Table, app_id: AppId, limit: int, what: str
) -> None:
    """Raise ``LimitExceeded`` when the app already holds ``limit`` rows of ``table``
    (the app row is locked first, so concurrent creates are counted in turn)."""
    await lock_app(c, app_id)
    held = await c.scalar(
        sa.select(sa.func.count()).select_from(table).where(table.c.app_id == app_id)
    )
    if held is not None and held >= limit:
        raise LimitExceeded(f"an app holds at most {limit} {what}")
