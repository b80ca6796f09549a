"""A retried operation's failures while the database is away: a line when the outage
starts, one a minute while it lasts, one when it ends (``manager_core.outage_log``):
the dispatcher's claims, lease recovery and heartbeat, its rows and their host calls,
and the storage compactor."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any

import anyio
import attrs
import psycopg
import pytest
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from manager_core import tables as t
from manager_core.completer import BatchCompleter
from manager_core.db import make_engine
from manager_core.outage_log import OutageLog
from manager_core.postgres.storage import PostgresStorageRepo
from manager_core.storage import StorageCompactor
from picloud_shared.events import HttpEvent
from picloud_shared.execution import ExecResult, ScriptResponse
from picloud_shared.ids import AppId, new_execution_id
from picloud_shared.ports import HostApi
from picloud_shared.principals import Principal
from tests.manager.dispatch_world import World, make_world
from tests.manager.test_db_recovery import SwitchedRelay, dispatcher
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


# ---------------------------------------------------------------- the other retried paths
# Each meets the database being away as the claims do: a line when it starts, one a
# minute while it lasts, one when it works again, and no traceback per failure; what
# is not the database away (a bug) keeps its traceback, every time.


def _gone() -> OperationalError:
    """What SQLAlchemy raises for a statement while PostgreSQL is down."""
    return OperationalError(
        "SELECT …", {}, psycopg.OperationalError("connection failed: Connection refused")
    )


def _lines(caplog: pytest.LogCaptureFixture, what: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(what)]


async def _eventually(check: Callable[[], bool], timeout: float = 30) -> None:
    """Wait (polling) until ``check()``; fail after ``timeout`` seconds."""
    with anyio.fail_after(timeout):
        while not check():  # noqa: ASYNC110 - a log line or a call count: nothing to wait on
            await anyio.sleep(0.02)


async def _until_logged(caplog: pytest.LogCaptureFixture, text: str) -> None:
    await _eventually(lambda: text in caplog.text)


def _assert_one_outage(lines: list[str], what: str, failures: int | None = None) -> None:
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"{what} failed: the database is unavailable; "), lines
    ended = f"{what} works again, after {'' if failures is None else failures}"
    assert lines[1].startswith(ended), lines


@pytest.mark.anyio
async def test_the_compactor_logs_a_stopped_database_once(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL goes away (every connection cut, new ones refused) while the
    compactor folds every 50 ms: its twenty-odd failed passes are one line, no
    traceback, and the pass that works once it is back says so."""
    async with SwitchedRelay.running(db_url) as relay:
        engine = make_engine(relay.url, pool_size=2, max_overflow=2)
        compactor = StorageCompactor(PostgresStorageRepo(engine), interval=0.05)
        try:
            with caplog.at_level(logging.INFO, logger="picloud.storage"):
                async with anyio.create_task_group() as tg:
                    await tg.start(compactor.run)
                    await anyio.sleep(0.2)
                    relay.go_away()
                    await anyio.sleep(1.0)
                    relay.come_back()
                    await _until_logged(caplog, "folding storage deltas works again")
                    compactor.stop()
        finally:
            await engine.dispose()
    records = [r for r in caplog.records if r.name == "picloud.storage"]
    _assert_one_outage([r.getMessage() for r in records], "folding storage deltas")
    assert "next try in 0.05 s" in records[0].getMessage()
    assert not [r for r in records if r.exc_info]


@pytest.mark.anyio
async def test_the_compactor_logs_a_bug_with_its_traceback_every_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken:
        calls = 0

        async def compact(self) -> int:
            Broken.calls += 1
            raise ValueError("a bug")

    compactor = StorageCompactor(Broken(), interval=0.01)  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="picloud.storage"):
        async with anyio.create_task_group() as tg:
            await tg.start(compactor.run)
            await _eventually(lambda: Broken.calls >= 3)
            compactor.stop()
    records = [r for r in caplog.records if r.name == "picloud.storage"]
    assert len(records) >= 3
    assert all(r.exc_info and r.levelname == "ERROR" for r in records)
    assert records[0].getMessage() == "folding storage deltas failed; next try in 0.01 s"


def _failing_first(real: Any, n: int, error: Callable[[], BaseException]) -> Any:
    """``real``, but its first ``n`` calls raise ``error()``."""
    calls: list[int] = []

    async def call(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) <= n:
            raise error()
        return await real(*args, **kwargs)

    call.calls = calls  # type: ignore[attr-defined]
    return call


@pytest.mark.anyio
async def test_lease_recovery_and_the_heartbeat_log_an_outage_once(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """Lease recovery (every 20 ms) and the heartbeat (every 50 ms) failing for the
    database being away, six times each: one line each when it starts, one when it
    works again, no traceback."""
    outbox = world.outbox
    outbox.recover_expired = _failing_first(  # type: ignore[method-assign]
        outbox.recover_expired, 6, lambda: psycopg.OperationalError("connection refused")
    )
    outbox.renew_leases = _failing_first(  # type: ignore[method-assign]
        outbox.renew_leases, 6, lambda: psycopg.OperationalError("connection refused")
    )
    d = world.dispatcher(recover_interval=0.02, lease_seconds=0.15)
    d._leased[-1] = "no such claim"  # a lease to renew: the heartbeat runs
    with caplog.at_level(logging.INFO, logger="picloud.dispatcher"):
        async with world.running(d):
            await _until_logged(caplog, "recovering expired leases works again")
            await _until_logged(caplog, "renewing leases works again")
    _assert_one_outage(
        _lines(caplog, "recovering expired leases"), "recovering expired leases", failures=6
    )
    _assert_one_outage(_lines(caplog, "renewing leases"), "renewing leases", failures=6)
    assert not [r for r in caplog.records if r.exc_info]


@pytest.mark.anyio
async def test_lease_recovery_and_the_heartbeat_log_a_bug_with_its_traceback(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    outbox = world.outbox
    recover = _failing_first(outbox.recover_expired, 3, lambda: ValueError("a bug"))
    renew = _failing_first(outbox.renew_leases, 3, lambda: ValueError("a bug"))
    outbox.recover_expired = recover  # type: ignore[method-assign]
    outbox.renew_leases = renew  # type: ignore[method-assign]
    d = world.dispatcher(recover_interval=0.02, lease_seconds=0.15)
    d._leased[-1] = "no such claim"
    with caplog.at_level(logging.INFO, logger="picloud.dispatcher"):
        async with world.running(d):
            await _eventually(lambda: len(recover.calls) >= 4 and len(renew.calls) >= 4)
    for what in ("recovering expired leases", "renewing leases"):
        records = [r for r in caplog.records if r.getMessage().startswith(what)]
        assert len(records) == 3, [r.getMessage() for r in records]
        assert all(r.exc_info and r.levelname == "ERROR" for r in records)


FAILING_SCRIPT = "def handle(e, ctx):\n    raise ValueError('the script fails')\n"
READING_SCRIPT = "def handle(e, ctx):\n    ctx.kv.get('k')\n"


@asynccontextmanager
async def _serial_world(engine: AsyncEngine) -> AsyncIterator[World]:
    """A world that runs one execution at a time: the failures come in order."""
    async with make_world(engine, gate_size=1) as w:
        yield w


@pytest.mark.anyio
async def test_rows_whose_dispatch_meets_an_outage_are_logged_once(
    engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    """Five rows whose failure cannot be booked (the database away): one line, no
    traceback per row; the sixth, booked, ends the outage."""
    async with _serial_world(engine) as world:
        script_id = await world.script(FAILING_SCRIPT)
        route = await world.route(script_id, "/f")
        world.outbox.take = _failing_first(world.outbox.take, 5, _gone)  # type: ignore[method-assign]
        for _ in range(6):
            await world.outbox.enqueue(http_row(world, script_id, route, HttpEvent("GET", "/")))
        with caplog.at_level(logging.INFO, logger="picloud.dispatcher"):
            async with world.running():
                await _until_logged(caplog, "dispatching outbox rows works again")
    _assert_one_outage(
        _lines(caplog, "dispatching outbox row"), "dispatching outbox rows", failures=5
    )
    assert not [r for r in caplog.records if r.exc_info]


@pytest.mark.anyio
async def test_a_row_whose_dispatch_meets_a_bug_is_logged_with_its_traceback(
    engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    async with _serial_world(engine) as world:
        script_id = await world.script(FAILING_SCRIPT)
        route = await world.route(script_id, "/f")
        take = _failing_first(world.outbox.take, 3, lambda: ValueError("a bug"))
        world.outbox.take = take  # type: ignore[method-assign]
        for _ in range(4):
            await world.outbox.enqueue(http_row(world, script_id, route, HttpEvent("GET", "/")))
        with caplog.at_level(logging.INFO, logger="picloud.dispatcher"):
            async with world.running():
                await world.wait_count(t.executions, t.executions.c.status == "retrying")
    records = [r for r in caplog.records if r.getMessage().startswith("dispatching outbox row")]
    assert len(records) == 3, [r.getMessage() for r in records]
    assert all(r.exc_info and r.getMessage().endswith("it will come back") for r in records)


@attrs.define
class FailingHost:
    """A host whose ``kv_get`` raises ``error()`` for the first ``n`` calls (of every
    host built by ``failing_hosts``)."""

    inner: HostApi
    calls: list[int]
    n: int
    error: Callable[[], BaseException]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def kv_get(self, key: str) -> Any:
        self.calls.append(1)
        if len(self.calls) <= self.n:
            raise self.error()
        return await self.inner.kv_get(key)


def failing_hosts(world: World, n: int, error: Callable[[], BaseException]) -> Any:
    calls: list[int] = []

    def factory(conn: AsyncConnection, app_id: AppId, principal: Principal, depth: int) -> Any:
        return FailingHost(world.host_factory(conn, app_id, principal, depth), calls, n, error)

    return factory


@pytest.mark.anyio
async def test_host_calls_that_meet_an_outage_are_logged_once(
    engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    """Five executions whose host call finds the database away: one line, no
    traceback; the sixth, whose host call works, ends the outage."""
    async with _serial_world(engine) as world:
        script_id = await world.script(READING_SCRIPT)
        route = await world.route(script_id, "/r")
        for _ in range(6):
            await world.outbox.enqueue(http_row(world, script_id, route, HttpEvent("GET", "/")))
        d = dispatcher(world, failing_hosts(world, 5, _gone))
        with caplog.at_level(logging.INFO, logger="picloud.dispatcher"):
            async with world.running(d):
                await _until_logged(caplog, "serving host calls works again")
    _assert_one_outage(_lines(caplog, "serving host calls"), "serving host calls", failures=5)
    assert "host call failed" not in caplog.text
    assert not [r for r in caplog.records if r.exc_info]


@pytest.mark.anyio
async def test_a_host_call_that_meets_a_bug_is_logged_with_its_traceback(
    engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    async with _serial_world(engine) as world:
        script_id = await world.script(READING_SCRIPT)
        route = await world.route(script_id, "/r")
        for _ in range(3):
            await world.outbox.enqueue(http_row(world, script_id, route, HttpEvent("GET", "/")))
        d = dispatcher(world, failing_hosts(world, 3, lambda: RuntimeError("a bug")))
        with caplog.at_level(logging.INFO, logger="picloud.dispatcher"):
            async with world.running(d):
                await world.wait_count(
                    t.executions, t.executions.c.status == "retrying", at_least=3
                )
    records = [r for r in caplog.records if r.getMessage().startswith("host call failed")]
    assert len(records) == 3, [r.getMessage() for r in records]
    assert all(r.exc_info and r.levelname == "ERROR" for r in records)


class _Completions:
    """An outbox whose ``complete_batch`` fails ``n`` times with ``error()``."""

    def __init__(self, n: int, error: Callable[[], BaseException]) -> None:
        self.n, self.error, self.calls = n, error, 0

    async def complete_batch(self, items: list[Any]) -> set[int]:
        self.calls += 1
        if self.calls <= self.n:
            raise self.error()
        return {claim.row.id for claim, _ in items}


def _completion(row_id: int) -> tuple[Any, Any]:
    claim = SimpleNamespace(row=SimpleNamespace(id=row_id, reply_to=None))
    return claim, ExecResult.succeeded(new_execution_id(), ScriptResponse.empty())


@pytest.mark.anyio
@pytest.mark.parametrize("outage", [True, False], ids=["database away", "a bug"])
async def test_completions_that_fail_are_logged_once_for_an_outage_and_each_for_a_bug(
    caplog: pytest.LogCaptureFixture, outage: bool
) -> None:
    """Completing a batch when the database is away: one line when it starts, one when
    a batch completes again, no traceback (every execution finishing meets it); a bug
    is logged with its traceback, batch by batch."""
    error = _gone if outage else (lambda: ValueError("a bug"))
    outbox = _Completions(4, error)
    completer = BatchCompleter(outbox)  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="picloud.dispatcher"):
        for row_id in range(4):
            with pytest.raises(type(error())):
                await completer.complete(*_completion(row_id))
        assert await completer.complete(*_completion(9))
    lines = _lines(caplog, "completing")
    if outage:
        _assert_one_outage(lines, "completing executions", failures=4)
        assert not [r for r in caplog.records if r.exc_info]
    else:
        assert lines == ["completing 1 execution(s) failed"] * 4
        assert all(r.exc_info for r in caplog.records if r.getMessage().startswith("completing"))
