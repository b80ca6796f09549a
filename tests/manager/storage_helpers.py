"""Reading an app's storage the way the tests check it: from scratch, and as accounted."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from picloud_shared.ids import AppId

# What an app stores, counted from its data (the definition of
# manager_core.postgres.storage, written out independently of it).
RECOUNT = sa.text(
    """
    SELECT COALESCE((SELECT sum(octet_length(key) + octet_length(value::text))
                     FROM kv_entries WHERE app_id = :app), 0)
         + COALESCE((SELECT sum(octet_length(collection) + octet_length(id)
                                + octet_length(data::text))
                     FROM documents WHERE app_id = :app), 0)
    """
)


async def recount(engine: AsyncEngine, app: AppId) -> int:
    """The app's stored bytes, counted from scratch."""
    async with engine.connect() as conn:
        return int((await conn.execute(RECOUNT, {"app": app})).scalar_one())


async def compacted(engine: AsyncEngine, app: AppId) -> int | None:
    """``app_storage.bytes`` of the app (``None``: no row)."""
    async with engine.connect() as conn:
        return await conn.scalar(
            sa.text("SELECT bytes FROM app_storage WHERE app_id = :app"), {"app": app}
        )


async def pending(engine: AsyncEngine, app: AppId | None = None) -> int:
    """How many delta rows wait to be folded (of the app, or of all apps)."""
    sql = "SELECT count(*) FROM app_storage_deltas"
    if app is not None:
        sql += " WHERE app_id = :app"
    async with engine.connect() as conn:
        return int(await conn.scalar(sa.text(sql), {"app": app}) or 0)
