"""Quotas on configuration rows: per app (``MAX_ROUTES_PER_APP``, ...) and the apps a
user created (``MAX_APPS_PER_USER``)."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from manager_core import tables as t
from picloud_shared.errors import LimitExceeded, NotFound
from picloud_shared.ids import AppId, UserId


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


async def check_apps_created(c: AsyncConnection, user_id: UserId, limit: int) -> None:
    """Raise ``LimitExceeded`` when the user, unless an instance admin, created
    ``limit`` apps that still exist; ``NotFound`` when there is no such user. The
    user row is locked first (``FOR NO KEY UPDATE``, which the key-share locks of
    rows referring to the user do not wait for), so one user's concurrent creates
    are counted in turn."""
    is_admin = await c.scalar(
        sa.select(t.users.c.is_instance_admin)
        .where(t.users.c.id == user_id)
        .with_for_update(key_share=True)
    )
    if is_admin is None:
        raise NotFound("no such user")
    if is_admin:
        return
    held = await c.scalar(
        sa.select(sa.func.count()).select_from(t.apps).where(t.apps.c.created_by == user_id)
    )
    if held is not None and held >= limit:
        raise LimitExceeded(
            f"a user may have at most {limit} apps they created; delete one to create another"
        )
