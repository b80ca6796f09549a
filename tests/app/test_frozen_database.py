"""A PostgreSQL that stops answering without closing its connections (SIGSTOP, a
frozen VM, a partition) costs the admin API and user routes a 503 within the
statement bound, not a request that never ends; once it answers again the node
serves as before, without a restart.

The node runs in-process (uvicorn, the real app and services) on a database reached
through :class:`~tests.pg_relay.PgRelay`, which stops forwarding bytes on demand.
Its statement bound is ``BOUND`` here (``STATEMENT_WAIT_SECONDS`` in production).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import attrs
import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from manager_core.db import CONNECTION_WAIT_SECONDS
from picloud.app import create_app
from picloud.services import Services, build_services, running
from picloud.settings import Settings
from tests.pg_relay import PgRelay
from tests.uvicorn_server import serving

pytestmark = pytest.mark.anyio

BOUND = 1.5  # seconds a request's statement goes unanswered before PostgreSQL is asked
# A statement PostgreSQL does not answer is given up after BOUND and as long again for
# the look at the server. A request during the hang waits for that, or for a connection
# (a new one: the relay URL's connect_timeout, 2 s; a free one from a full pool:
# CONNECTION_WAIT_SECONDS), and at worst twice (one that queued behind another
# request's outbox write or route read waits for that first). The rest is slack for a
# loaded 2-core machine.
GIVEN_UP_AFTER = 2 * BOUND
ANSWER_WITHIN = 2 * max(GIVEN_UP_AFTER, CONNECTION_WAIT_SECONDS) + 4
RECOVERY_SECONDS = 60  # pools reconnect with a backoff after the hang
NEVER = 60  # a request the fix does not bound waits for ever: give up here

NOOP = "def handle(event, ctx):\n    return None\n"
HIT = """
def handle(event, ctx):
    ctx.kv.set("hit:" + ctx.execution_id, event["path"])
    return "ok"
"""


@attrs.define
class Node:
    relay: PgRelay
    services: Services
    http: httpx.AsyncClient
    base: str = ""  # the admin path of the test's app

    async def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return await self.http.request(method, f"/api/v1/admin{path}", **kwargs)

    async def ok(self, method: str, path: str, expect: int = 200, **kwargs: Any) -> Any:
        r = await self.admin(method, f"{self.base}{path}", **kwargs)
        assert r.status_code == expect, r.text
        return r.json()

    async def listed(self, path: str, **params: Any) -> list[dict[str, Any]]:
        return list((await self.ok("GET", path, params={"limit": 100, **params}))["items"])


@asynccontextmanager
async def frozen_node(db_url: str) -> AsyncIterator[Node]:
    """A started node behind a relay, an instance admin's client, and an app."""
    async with PgRelay.running(db_url) as relay:
        services = build_services(
            Settings(executor_max_workers=1, max_concurrent_executions=4),
            relay.url,
            node_id="frozen-node",
        )
        _, token = await services.users.create_user("root", instance_admin=True)
        app = create_app(services, statement_wait_seconds=BOUND)
        auth = {"Authorization": f"Bearer {token}"}
        async with (
            running(services),
            serving(app) as port,
            httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}", headers=auth, timeout=NEVER
            ) as http,
        ):
            node = Node(relay, services, http)
            created = await node.ok("POST", "/apps", expect=201, json={"name": "frozen"})
            node.base = f"/apps/{created['id']}"
            try:
                yield node
            finally:
                relay.thaw()  # a test that failed frozen: the node still stops cleanly


async def timed(call: Awaitable[httpx.Response]) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    with anyio.fail_after(NEVER):
        response = await call
    return response, time.monotonic() - started


async def during_the_hang(*calls: Callable[[], Awaitable[httpx.Response]]) -> list[Any]:
    """Run ``calls`` at once; each (response, seconds)."""
    results: list[Any] = [None] * len(calls)

    async def one(i: int) -> None:
        results[i] = await timed(calls[i]())

    async with anyio.create_task_group() as tg:
        for i in range(len(calls)):
            tg.start_soon(one, i)
    return results


def assert_unavailable(response: httpx.Response, seconds: float, *, route: bool = False) -> None:
    """A 503 with Retry-After and the error body (a user route's names no execution)."""
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "1"
    error = response.json()["error"]
    assert error["code"] == "unavailable", error
    assert "the database" in error["message"], error
    if route:
        assert set(error) == {"code", "message", "execution_id"}
        assert error["execution_id"] is None
    assert seconds < ANSWER_WITHIN, f"answered after {seconds:.1f} s"


async def eventually(call: Callable[[], Awaitable[httpx.Response]], status: int) -> httpx.Response:
    """``call`` until it answers ``status`` (the node recovers by itself)."""
    deadline = time.monotonic() + RECOVERY_SECONDS
    while True:
        response = await call()
        if response.status_code == status or time.monotonic() > deadline:
            assert response.status_code == status, response.text
            return response
        await anyio.sleep(0.2)


async def until(check: Callable[[], Awaitable[bool]], seconds: float = 30) -> None:
    """Poll ``check`` until it holds (what it waits for has no event to wait on)."""
    with anyio.fail_after(seconds):
        while not await check():  # noqa: ASYNC110 - polling the node from outside
            await anyio.sleep(0.05)


async def succeeded(node: Node, execution_id: str) -> bool:
    return bool((await node.ok("GET", f"/executions/{execution_id}"))["status"] == "succeeded")


async def assert_whole(node: Node) -> None:
    """Every stored ``k-*`` key has the execution of its KV trigger, and every such
    execution a key: a write committed with its fan-out, or not at all."""
    keys = await node.listed("/kv", prefix="k-")
    fired = await node.listed("/executions", source_kind="kv")
    assert len(keys) == len(fired), (keys, fired)


async def assert_pools_settle(services: Services) -> None:
    """No connection stays checked out of the engine's pool, and nobody waits for one
    of the outbox pool's."""

    async def settled() -> bool:
        engine_pool: Any = services.engine.pool
        return engine_pool.checkedout() == 0 and not services.pool.get_stats()["requests_waiting"]

    await until(settled)


async def test_admin_reads_and_writes_answer_503_within_the_bound(db_url: str) -> None:
    """While PostgreSQL hangs, an admin GET and an admin PUT answer 503 (unavailable,
    Retry-After) within the bound. Once it answers again the same requests succeed,
    the write made before the hang is intact, and the one attempted during it was not
    applied in part: its key and its trigger's execution are both there or neither."""
    async with frozen_node(db_url) as node:
        await node.ok("POST", "/scripts", expect=201, json={"name": "noop", "source": NOOP})
        trigger = {"script": "noop", "key_glob": "k-*"}
        await node.ok("POST", "/triggers/kv", expect=201, json=trigger)
        await node.ok("PUT", "/kv/k-before", json={"v": 1}, expect=201)

        node.relay.freeze()
        (read, read_s), (write, write_s) = await during_the_hang(
            lambda: node.admin("GET", f"{node.base}/kv/k-before"),
            lambda: node.admin("PUT", f"{node.base}/kv/k-during", json={"v": 2}),
        )
        assert_unavailable(read, read_s)
        assert_unavailable(write, write_s)
        listing, listing_s = await timed(node.admin("GET", "/apps"))
        assert_unavailable(listing, listing_s)
        node.relay.thaw()

        got = await eventually(lambda: node.admin("GET", f"{node.base}/kv/k-before"), 200)
        assert got.json()["value"] == {"v": 1}
        await assert_whole(node)
        await node.ok("PUT", "/kv/k-during", json={"v": 3}, expect=201)
        assert (await node.ok("GET", "/kv/k-during"))["value"] == {"v": 3}
        await assert_whole(node)
        many = [lambda: node.admin("GET", f"{node.base}/kv/k-before") for _ in range(12)]
        answers = await during_the_hang(*many)
        assert all(r.status_code == 200 for r, _ in answers), [(r.text, s) for r, s in answers]
        await assert_pools_settle(node.services)


async def test_a_commit_postgres_does_not_answer_is_bounded_too(db_url: str) -> None:
    """PostgreSQL stops answering just as an admin write commits (the commit is
    shielded from cancellation): the write still answers 503 within the bound. The
    server had the COMMIT, so once it answers again the write is there whole: the key
    with its trigger's execution."""
    async with frozen_node(db_url) as node:
        await node.ok("POST", "/scripts", expect=201, json={"name": "noop", "source": NOOP})
        trigger = {"script": "noop", "key_glob": "k-*"}
        await node.ok("POST", "/triggers/kv", expect=201, json=trigger)
        await node.ok("PUT", "/kv/k-before", json={"v": 1}, expect=201)

        node.relay.freeze_at_commit(b"k-at-commit")
        write, seconds = await timed(node.admin("PUT", f"{node.base}/kv/k-at-commit", json=7))
        assert node.relay.frozen_at is not None, "the commit never came"
        assert_unavailable(write, seconds)
        node.relay.thaw()

        got = await eventually(lambda: node.admin("GET", f"{node.base}/kv/k-at-commit"), 200)
        assert got.json()["value"] == 7
        assert (await node.ok("GET", "/kv/k-before"))["value"] == {"v": 1}
        await assert_whole(node)
        assert len(await node.listed("/executions", source_kind="kv")) == 2
        await assert_pools_settle(node.services)


async def test_sync_and_async_routes_answer_503_within_the_bound(db_url: str) -> None:
    """While PostgreSQL hangs, a sync and an async user route answer 503 in the route
    failure shape within the bound. Once it answers again both serve; what ran before
    the hang is intact, and an execution's effects exist exactly when it succeeded
    (a request refused during the hang may have been written all the same: an async
    one then runs whole once PostgreSQL answers)."""
    async with frozen_node(db_url) as node:
        await node.ok("POST", "/scripts", expect=201, json={"name": "hit", "source": HIT})
        for path, mode in (("/s", "sync"), ("/a", "async")):
            route = {"method": "POST", "path": path, "script": "hit", "dispatch_mode": mode}
            await node.ok("POST", "/routes", expect=201, json=route)
        assert (await node.http.post("/apps/frozen/s")).text == "ok"
        accepted = (await node.http.post("/apps/frozen/a")).json()["execution_id"]
        await until(lambda: succeeded(node, accepted))

        node.relay.freeze()
        (sync, sync_s), (later, later_s) = await during_the_hang(
            lambda: node.http.post("/apps/frozen/s"),
            lambda: node.http.post("/apps/frozen/a"),
        )
        assert_unavailable(sync, sync_s, route=True)
        assert_unavailable(later, later_s, route=True)
        node.relay.thaw()

        ran = await eventually(lambda: node.http.post("/apps/frozen/s"), 200)
        assert ran.text == "ok"
        queued = await eventually(lambda: node.http.post("/apps/frozen/a"), 202)
        execution = queued.json()["execution_id"]
        await until(lambda: succeeded(node, execution))
        assert (await node.ok("GET", f"/kv/hit:{accepted}"))["value"] == "/a"
        before = {e["id"] for e in await node.listed("/executions") if e["status"] == "succeeded"}
        hits = {k["key"].removeprefix("hit:") for k in await node.listed("/kv", prefix="hit:")}
        after = {e["id"] for e in await node.listed("/executions") if e["status"] == "succeeded"}
        assert before <= hits <= after, (before, hits, after)
        await assert_pools_settle(node.services)


async def test_a_write_waiting_on_a_lock_is_not_cut_short(db_url: str, engine: AsyncEngine) -> None:
    """PostgreSQL answers, but an admin write waits on a row lock (a running script
    holds the keys it read until it ends) well past the bound: the node sees
    the server answer a new connection, keeps waiting, and the write succeeds once
    the lock is released."""
    async with frozen_node(db_url) as node:
        await node.ok("PUT", "/kv/k-locked", json=1, expect=201)
        answers: list[Any] = []

        async def write() -> None:
            answers.append(await timed(node.admin("PUT", f"{node.base}/kv/k-locked", json=2)))

        async with engine.connect() as blocker, anyio.create_task_group() as tg:
            locked = "SELECT 1 FROM kv_entries WHERE key = 'k-locked' FOR UPDATE"
            assert (await blocker.execute(text(locked))).all()
            tg.start_soon(write)
            await anyio.sleep(GIVEN_UP_AFTER + BOUND)  # two looks at the server
            assert not answers, answers
            await blocker.commit()
        [(written, seconds)] = answers
        assert written.status_code == 200, written.text
        assert seconds > GIVEN_UP_AFTER + BOUND
        assert (await node.ok("GET", "/kv/k-locked"))["value"] == 2
        await assert_pools_settle(node.services)
