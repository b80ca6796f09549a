"""The composition root started in-process: what ``running`` does around the node."""

from __future__ import annotations

import gc
import os
import socket
from datetime import timedelta

import anyio
import httpx
import pytest

from manager_core.postgres.outbox import PostgresOutboxRepo
from orchestrator_core.route_cache import CachedRouteTable
from picloud import metrics
from picloud.app import create_app
from picloud.services import build_services, default_node_id, running
from picloud.settings import Settings
from tests.app.server import free_port
from tests.manager import factories

pytestmark = pytest.mark.anyio


async def test_a_running_node_keeps_its_startup_objects_out_of_the_collector(
    db_url: str,
) -> None:
    """Started, the node's long-lived objects are frozen (full collections skip them);
    stopped, they are given back, so a stopped node's garbage can be collected."""
    services = build_services(Settings(executor_max_workers=1), db_url, node_id="gc-node")
    assert gc.get_freeze_count() == 0
    async with running(services):
        assert services.dispatcher.ready
        assert gc.get_freeze_count() > 10_000
    assert gc.get_freeze_count() == 0


async def test_the_retention_task_runs_with_the_node_and_stops_with_it(db_url: str) -> None:
    """With retention on, the node starts its pruning task and still stops cleanly;
    with ``execution_retention_days=0`` there is no task at all."""
    services = build_services(Settings(executor_max_workers=1), db_url, node_id="r-node")
    assert services.retention is not None
    assert services.retention.keep_for == timedelta(days=14)
    assert services.retention._dead_letters is services.dead_letters
    with anyio.fail_after(60):
        async with running(services):
            assert services.retention._scope is not None  # started
    assert services.retention._scope.cancel_called
    off = build_services(
        Settings(executor_max_workers=1, execution_retention_days=0), db_url, node_id="r-off"
    )
    assert off.retention is None
    await off.engine.dispose()


async def test_readyz_names_what_is_not_ready(db_url: str) -> None:
    """Not started: the dispatcher is not running (503). A database that does not
    answer is named too. Started: ready (200)."""
    services = build_services(Settings(executor_max_workers=1), db_url, node_id="ready-node")
    app = create_app(services)  # httpx's ASGI transport runs no lifespan: nothing started
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://n") as c:
        r = await c.get("/readyz")
        assert r.status_code == 503
        assert r.json() == {"status": "unavailable", "problems": ["dispatcher: not running"]}
        with anyio.fail_after(60):
            async with running(services):
                r = await c.get("/readyz")
                assert (r.status_code, r.json()) == (200, {"status": "ready"})
    await services.engine.dispose()

    port = free_port()  # nothing listens there
    gone = db_url.rsplit("@", 1)[0] + f"@127.0.0.1:{port}/nowhere"
    down = build_services(Settings(executor_max_workers=1), gone, node_id="down-node")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(create_app(down)), base_url="http://n"
    ) as c:
        r = await c.get("/readyz")
    assert r.status_code == 503
    problems = r.json()["problems"]
    assert problems[0].startswith("database: ")
    assert problems[1:] == ["dispatcher: not running"]
    await down.engine.dispose()


async def test_admin_changes_reach_this_nodes_route_cache(db_url: str) -> None:
    """Deleting an app or a route, or updating a script, through this node's repos
    empties the route cache its user routes read."""
    services = build_services(Settings(executor_max_workers=1), db_url, node_id="cache-node")
    cache = services.orchestrator.route_table
    assert isinstance(cache, CachedRouteTable)
    for repo in (services.apps, services.routes, services.scripts):
        cache._entries["shop"] = (float("inf"), [])
        (notify,) = repo.changed
        notify()
        assert cache._entries == {}
    await services.engine.dispose()


async def test_a_route_created_through_this_nodes_admin_api_leaves_its_route_cache(
    db_url: str,
) -> None:
    """With ``GET /u/{id}`` cached, creating ``GET /u/me`` through the node's admin API
    drops the cached routes at once: the next lookup reads them afresh, new route
    included (so ``/u/me`` is not served by ``/u/{id}`` for the cache's ttl)."""
    services = build_services(Settings(executor_max_workers=1), db_url, node_id="create-node")
    cache = services.orchestrator.route_table
    assert isinstance(cache, CachedRouteTable)
    _, token = await services.users.create_user("root", instance_admin=True)
    transport = httpx.ASGITransport(create_app(services))
    async with httpx.AsyncClient(
        transport=transport,
        base_url="http://n/api/v1/admin",
        headers={"Authorization": f"Bearer {token}"},
    ) as admin:
        app = await admin.post("/apps", json={"name": "cached"})
        base = f"/apps/{app.json()['id']}"
        source = "def handle(e, ctx):\n    return 1\n"
        assert (
            await admin.post(f"{base}/scripts", json={"name": "s", "source": source})
        ).is_success
        route = {"method": "GET", "path": "/u/{id}", "script": "s"}
        assert (await admin.post(f"{base}/routes", json=route)).status_code == 201
        await cache.lookup("cached")
        _, from_cache = await cache.lookup("cached")
        assert from_cache
        route = {"method": "GET", "path": "/u/me", "script": "s"}
        assert (await admin.post(f"{base}/routes", json=route)).status_code == 201
        targets, from_cache = await cache.lookup("cached")
    assert not from_cache
    assert sorted(t.path for t in targets or ()) == ["/u/me", "/u/{id}"]
    await services.engine.dispose()


async def test_the_outbox_is_counted_at_most_once_a_second(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/metrics needs no token, so scrapes reuse a count younger than
    DEPTH_MAX_AGE_SECONDS; an older one is read again."""
    assert metrics.DEPTH_MAX_AGE_SECONDS == 1.0
    monkeypatch.setattr(metrics, "DEPTH_MAX_AGE_SECONDS", 0.5)
    services = build_services(Settings(executor_max_workers=1), db_url, node_id="m-node")
    app = create_app(services)

    async def depth() -> str:
        text = (await c.get("/metrics")).text
        return next(line for line in text.splitlines() if line.startswith("picloud_outbox_depth"))

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://n") as c:
        assert (await depth()).endswith(" 0.0")
        app_id = await factories.app(services.engine)
        await PostgresOutboxRepo(services.engine).enqueue(factories.http_row(app_id))
        assert (await depth()).endswith(" 0.0")  # the count of a moment ago
        await anyio.sleep(0.6)
        assert (await depth()).endswith(" 1.0")
    await services.engine.dispose()


async def test_metrics_show_the_body_budget(db_url: str) -> None:
    """/metrics shows the request-body bytes held, the budget and its refusals."""
    services = build_services(Settings(executor_max_workers=1), db_url, node_id="b-node")
    app = create_app(services)
    budget = services.orchestrator.body_budget

    async def figures() -> dict[str, float]:
        text = (await c.get("/metrics")).text
        wanted = (
            "picloud_body_bytes_in_flight",
            "picloud_body_budget_bytes",
            "picloud_body_budget_refusals_total",
        )
        return {
            name: float(line.split()[1])
            for line in text.splitlines()
            for name in wanted
            if line.startswith(name + " ")
        }

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://n") as c:
        assert await figures() == {
            "picloud_body_bytes_in_flight": 0.0,
            "picloud_body_budget_bytes": float(budget.capacity),
            "picloud_body_budget_refusals_total": 0.0,
        }
        with budget.share() as held:
            assert await held.cover(1000, 0)
            assert not await budget.share().cover(budget.capacity, 0)  # no room: refused
            assert await figures() == {
                "picloud_body_bytes_in_flight": 1000.0,
                "picloud_body_budget_bytes": float(budget.capacity),
                "picloud_body_budget_refusals_total": 1.0,
            }
        assert (await figures())["picloud_body_bytes_in_flight"] == 0.0
    await services.engine.dispose()


async def test_metrics_count_the_storage_compactions(db_url: str) -> None:
    """/metrics shows the node's compaction passes and the delta rows they folded."""
    services = build_services(Settings(executor_max_workers=1), db_url, node_id="s-node")
    app = create_app(services)

    async def figures() -> tuple[float, float]:
        text = (await c.get("/metrics")).text
        values = {
            line.split()[0]: float(line.split()[1])
            for line in text.splitlines()
            if line.startswith("picloud_storage_")
        }
        return (
            values["picloud_storage_compactions_total"],
            values["picloud_storage_deltas_folded_total"],
        )

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://n") as c:
        assert await figures() == (0.0, 0.0)
        app_id = await factories.app(services.engine)
        await services.kv.set(app_id, "a", 1)
        await services.kv.set(app_id, "b", 2)
        await services.compactor.compact_once()
        assert await figures() == (1.0, 2.0)
    await services.engine.dispose()


def test_two_nodes_never_share_a_default_node_id() -> None:
    """Nodes whose host name and pid coincide (containers, each its own pid 1) still
    get distinct ids: a node runs only the sync rows written with its own id."""
    first, second = default_node_id(), default_node_id()
    assert first != second
    assert first.startswith(f"{socket.gethostname()}-{os.getpid()}-")
