"""Deleting old records app by app, in batches (the retention task's statements)."""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from manager_core import tables as t
from manager_core.db import transaction
from picloud_shared.errors import InvalidInput


async def prune_by_app(
    engine: AsyncEngine, stmt: sa.TextClause, older_than: timedelta, batch: int
) -> int:
    """Run ``stmt`` (a ``DELETE`` of at most ``:batch`` rows of ``:app_id`` older than
    ``:older_than``, an interval the statement subtracts from the database's ``now()``)
    for every app until it deletes less than a batch; each run is its own transaction.
    Returns the rows deleted.

    The cutoff is an age, not a point in time: the rows' times are the database's, and
    a node's clock, possibly far off, must not decide what is old."""
    if batch < 1:
        raise InvalidInput("batch must be at least 1")
    if not isinstance(older_than, timedelta):
        raise TypeError("older_than is an age (a timedelta), not a point in time")
    async with engine.connect() as conn:
        apps = (await conn.execute(sa.select(t.apps.c.id))).scalars().all()
    deleted = 0
    for app_id in apps:
        while True:
            async with transaction(engine) as conn:
                result = await conn.execute(
                    stmt, {"app_id": app_id, "older_than": older_than, "batch": batch}
                )
            deleted += result.rowcount
            if result.rowcount < batch:
                break
    return deleted
