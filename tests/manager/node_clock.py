"""A node whose clock is off, for tests: its modules' ``datetime.now()`` is skewed.

Several nodes share one PostgreSQL, and their clocks need not agree with it. Every
time the database compares with its ``now()`` (``run_at``, ``claimed_until``,
``finished_at``, ``resolved_at``) must be computed by the database: a test skews the
node's clock far off, as the cluster audit did, and checks that the database's
clock wins.
"""

from __future__ import annotations

import sys
from datetime import datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

# Packages whose modules are the node (picloud_shared is left alone: its ``wire``
# checks isinstance against the real class).
NODE_PACKAGES = ("manager_core", "orchestrator_core", "picloud")


def skew_node_clock(monkeypatch: pytest.MonkeyPatch, skew: timedelta) -> None:
    """Make ``datetime.now()`` be ``skew`` off in every module of the node that holds
    ``datetime`` (as for a node whose machine's clock is off); PostgreSQL's ``now()``
    is unaffected."""

    class SkewedDatetime(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> datetime:  # type: ignore[override]
            return datetime.now(tz) + skew

    for name, module in list(sys.modules.items()):
        if name.split(".")[0] in NODE_PACKAGES and getattr(module, "datetime", None) is datetime:
            monkeypatch.setattr(module, "datetime", SkewedDatetime)


async def db_now(engine: AsyncEngine) -> datetime:
    """The database's ``now()``."""
    async with engine.connect() as conn:
        now: datetime = (await conn.execute(sa.select(sa.func.now()))).scalar_one()
    return now
