"""A retried operation's failures while the database is away: a line when the outage
starts, one a minute while it lasts, one when it ends (``manager_core.outage_log``)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from manager_core import tables as t
from manager_core.outage_log import OutageLog
from picloud_shared.events import HttpEvent
from tests.manager.dispatch_world import World, make_world
from tests.manager.test_dispatcher import http_row

log = logging.getLogger("test.outage")


@pytest.fixture
async def world(engine: AsyncEngine) -> AsyncIterator[World]:
    async with make_world(engine) as w:
        yield w


def _fail(outage: OutageLog, exc: BaseException) -> None:
    try:
        raise exc
    except BaseException as caught:
        outage.failed(caught)


def test_an_outage_is_logged_when_it_starts_once_a_minute_and_when_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A thousand failures over two and a half minutes are four lines, none with a
    traceback: the start, two "still fails" with their count, and the recovery."""
    now = [0.0]
    outage = OutageLog(log, "claiming outbox rows", clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="test.outage"):
        for i in range(1000):
            now[0] = i * 0.15
            _fail(outage, psycopg.OperationalError("connection refused"))
        outage.succeeded()
        outage.succeeded()  # nothing more: no outage
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4, lines
    assert lines[0].startswith("claiming outbox rows failed: ")
    assert lines[1].startswith("claiming outbox rows still fails: 401 times in 60 s")
    assert lines[2].startswith("claiming outbox rows still fails: 801 times in 120 s")
    assert lines[3] == "claiming outbox rows works again, after 1000 failures in 150 s"
    assert not [r for r in caplog.records if r.exc_info]


def test_a_failure_that_is_not_an_outage_keeps_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Anything but the database being away is a bug to see: logged every time, with
    its traceback, and it starts no outage."""
    outage = OutageLog(log, "claiming outbox rows", clock=lambda: 0.0)
    with caplog.at_level(logging.INFO, logger="test.outage"):
        for _ in range(3):
            _fail(outage, ValueError("a bug"))
        outage.succeeded()
    assert len(caplog.records) == 3
    assert all(r.exc_info and r.levelname == "ERROR" for r in caplog.records)


@pytest.mark.anyio
async def test_the_dispatcher_logs_claims_that_fail_for_an_outage_once(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """Claims failing because the database is away (five in a row) are one line, no
    traceback; the claim that works again says so, and the row then runs."""
    script_id = await world.script("def handle(e, ctx):\n    pass\n")
    route = await world.route(script_id, "/o")
    real = world.outbox.claim_due
    failures: list[int] = []

    async def claim_due(*args: Any, **kwargs: Any) -> Any:
        if len(failures) < 5:
            failures.append(1)
            raise psycopg.OperationalError("connection refused")
        return await real(*args, **kwargs)

    world.outbox.claim_due = claim_due  # type: ignore[method-assign]
    await world.outbox.enqueue(http_row(world, script_id, route, HttpEvent("GET", "/")))
    with caplog.at_level(logging.INFO, logger="picloud.dispatcher"):
        async with world.running():
            await world.wait_count(t.executions, t.executions.c.status == "succeeded")
    lines = [r.getMessage() for r in caplog.records if "claiming outbox rows" in r.getMessage()]
    assert len(lines) == 2, lines
    assert lines[0].startswith("claiming outbox rows failed: ")
    assert lines[1].startswith("claiming outbox rows works again, after 5 failures")
    assert not [r for r in caplog.records if r.exc_info]
