"""Deleting old records app by app, in batches (the retention task's statements)."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from manager_core import tables as t
from manager_core.db import transaction
from picloud_shared.errors import InvalidInput


async def prune_by_app(
    engine: AsyncEngine, stmt: sa.TextClause, before: datetime, batch: int
) -> int:
    """Run ``stmt`` (a ``DELETE`` of at most ``:batch`` rows of ``:app_id`` older than
    ``:before``) for every app until it deletes less than a batch; each run is its
    own transaction. Returns the rows deleted."""
    if batch < 1:
        raise InvalidInput("batch must be at least 1")
    async with engine.connect() as conn:
        apps = (await conn.execute(sa.select(t.apps.c.id))).scalars().all()
    deleted = 0
    for app_id in apps:
        while True:
            async with transaction(engine) as conn:
                result = await conn.execute(
                    stmt, {"app_id": app_id, "before": before, "batch": batch}
                )
            deleted += result.rowcount
            if result.rowcount < batch:
                break
    return deleted
