"""CachedRouteTable, and the orchestrator's rule: never 404/405 from the cache."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import anyio
import httpx
import pytest
from starlette.applications import Starlette

from orchestrator_core.inbox import InboxRegistry
from orchestrator_core.route_cache import CachedRouteTable
from orchestrator_core.routes import UserRouteOrchestrator
from picloud_shared.domain import DispatchMode, RouteTarget
from picloud_shared.errors import NotFound
from picloud_shared.gate import ExecutionGate
from picloud_shared.ids import AppId, RouteId, ScriptId
from picloud_shared.outbox import NewOutboxRow

pytestmark = pytest.mark.anyio
APP = AppId(uuid.uuid4())


def async_route(path: str) -> RouteTarget:
    return RouteTarget(
        RouteId(uuid.uuid4()),
        APP,
        "shop",
        "POST",
        path,
        DispatchMode.ASYNC,
        ScriptId(uuid.uuid4()),
        5,
    )


class CountingRoutes:
    """The database's answer, counting reads."""

    def __init__(self) -> None:
        self.apps: dict[str, list[RouteTarget]] = {"shop": [async_route("/a")]}
        self.reads = 0

    async def routes_for_app(self, app_name: str) -> Sequence[RouteTarget] | None:
        self.reads += 1
        routes = self.apps.get(app_name)
        return None if routes is None else list(routes)


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


class Outbox:
    def __init__(self) -> None:
        self.rows: list[NewOutboxRow] = []
        self.app_gone = False

    async def enqueue(self, row: NewOutboxRow) -> None:
        if self.app_gone:
            raise NotFound("app not found")
        self.rows.append(row)


async def test_answers_come_from_the_cache_until_the_ttl() -> None:
    """Within ttl one read serves every lookup; after it, the table is read again."""
    inner, clock = CountingRoutes(), Clock()
    cache = CachedRouteTable(inner, ttl=1.0, clock=clock)
    assert await cache.routes_for_app("shop") == await cache.routes_for_app("shop")
    assert inner.reads == 1
    clock.now = 1.5
    await cache.routes_for_app("shop")
    assert inner.reads == 2


async def test_unknown_apps_are_not_cached() -> None:
    """An app created a moment later is found at once."""
    inner = CountingRoutes()
    cache = CachedRouteTable(inner, clock=Clock())
    assert await cache.routes_for_app("new") is None
    inner.apps["new"] = []
    assert await cache.routes_for_app("new") == []


@pytest.fixture
def wired() -> tuple[httpx.AsyncClient, CountingRoutes, Outbox, Clock]:
    inner, clock, outbox = CountingRoutes(), Clock(), Outbox()
    cache = CachedRouteTable(inner, ttl=10.0, clock=clock)
    orch = UserRouteOrchestrator(cache, outbox, InboxRegistry(), ExecutionGate(2), node_id="n")
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=Starlette(routes=orch.routes())), base_url="http://t"
    )
    return client, inner, outbox, clock


async def test_a_route_created_after_caching_is_served_at_once(wired) -> None:  # type: ignore[no-untyped-def]
    """A cached miss is re-read before answering 404."""
    client, inner, outbox, _ = wired
    async with client:
        assert (await client.post("/apps/shop/a")).status_code == 202
        inner.apps["shop"].append(async_route("/b"))
        assert (await client.post("/apps/shop/b")).status_code == 202
        assert (await client.post("/apps/shop/a")).status_code == 202
    assert inner.reads == 2
    assert len(outbox.rows) == 3


async def test_an_app_deleted_after_caching_answers_404(wired) -> None:  # type: ignore[no-untyped-def]
    """The enqueue's NotFound becomes a 404 and drops the cached routes."""
    client, inner, outbox, _ = wired
    async with client:
        assert (await client.post("/apps/shop/a")).status_code == 202
        del inner.apps["shop"]
        outbox.app_gone = True
        assert (await client.post("/apps/shop/a")).status_code == 404
        assert (await client.post("/apps/shop/a")).status_code == 404


class SlowRoutes(CountingRoutes):
    """Reads that take a moment, so lookups pile up behind one."""

    def __init__(self) -> None:
        super().__init__()
        self.fail = False

    async def routes_for_app(self, app_name: str) -> Sequence[RouteTarget] | None:
        await anyio.sleep(0.05)
        if self.fail:
            self.reads += 1
            raise RuntimeError("database down")
        return await super().routes_for_app(app_name)


async def test_concurrent_lookups_of_an_expired_app_share_one_read() -> None:
    """No stampede: lookups that arrive while an app's routes are being read wait for
    that read instead of each making their own."""
    inner, clock = SlowRoutes(), Clock()
    cache = CachedRouteTable(inner, ttl=1.0, clock=clock)
    answers: list[object] = []

    async def lookup() -> None:
        answers.append(await cache.routes_for_app("shop"))

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(lookup)
    assert inner.reads == 1
    assert len(answers) == 10
    assert all(a == answers[0] for a in answers)


async def test_a_failed_shared_read_is_retried_by_each_waiter() -> None:
    """When the shared read fails, a waiter reads for itself rather than inheriting the
    error or a stale answer."""
    inner = SlowRoutes()
    inner.fail = True
    cache = CachedRouteTable(inner, ttl=1.0, clock=Clock())
    errors: list[BaseException] = []

    async def lookup() -> None:
        try:
            await cache.routes_for_app("shop")
        except RuntimeError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(lookup)
    assert len(errors) == 3
    assert inner.reads == 3


class StaleRoutes(CountingRoutes):
    """Reads that see the table as it is when they start, and answer a moment later."""

    async def routes_for_app(self, app_name: str) -> Sequence[RouteTarget] | None:
        answer = await super().routes_for_app(app_name)
        await anyio.sleep(0.05)
        return answer


async def test_a_read_under_way_when_invalidated_is_not_cached() -> None:
    """A lookup that began reading before a route was created (and invalidate called)
    returns what it read, but does not keep it: a lookup that arrives while that read
    is still going reads afresh, and sees the new route, as does the next one."""
    inner, clock = StaleRoutes(), Clock()
    cache = CachedRouteTable(inner, ttl=10.0, clock=clock)
    answers: dict[str, object] = {}

    async def lookup(name: str) -> None:
        answers[name] = await cache.routes_for_app("shop")

    async with anyio.create_task_group() as tg:
        tg.start_soon(lookup, "before")
        await anyio.sleep(0.01)  # the read has started, before the change
        inner.apps["shop"].append(async_route("/b"))
        cache.invalidate()
        tg.start_soon(lookup, "during")
    assert answers["before"] == inner.apps["shop"][:1]
    assert answers["during"] == inner.apps["shop"]
    assert await cache.routes_for_app("shop") == inner.apps["shop"]
    assert inner.reads == 2  # the stale read, and the one during (then cached)


async def test_invalidating_one_app_drops_its_read_under_way() -> None:
    """``invalidate(app)`` also keeps a read of that app under way out of the cache."""
    inner, clock = StaleRoutes(), Clock()
    cache = CachedRouteTable(inner, ttl=10.0, clock=clock)
    async with anyio.create_task_group() as tg:
        tg.start_soon(cache.routes_for_app, "shop")
        await anyio.sleep(0.01)
        inner.apps["shop"].append(async_route("/b"))
        cache.invalidate("shop")
    assert await cache.routes_for_app("shop") == inner.apps["shop"]
