"""Once PostgreSQL is back after an outage, a node serves user routes within about a
second, and ``/readyz`` says ready only when it does: it checks the outbox pool (every
user-route request's first statement) as well as the engine.

The node runs in-process (uvicorn, the real app and services) on a database reached
through :class:`~tests.manager.test_db_recovery.SwitchedRelay`, which can go away as a
stopped PostgreSQL does (connections cut, new ones refused) and come back.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import attrs
import httpx
import pytest

from picloud.app import READY_CHECK_SECONDS, create_app
from picloud.services import Services, build_services, running
from picloud.settings import Settings
from tests.manager.test_db_recovery import COUNT, OUTAGE_SECONDS, SERVES_WITHIN, SwitchedRelay
from tests.uvicorn_server import serving

pytestmark = pytest.mark.anyio


@attrs.define
class Node:
    relay: SwitchedRelay
    services: Services
    http: httpx.AsyncClient


@asynccontextmanager
async def node_with_a_route(db_url: str) -> AsyncIterator[Node]:
    """A started node behind a relay, with app ``back`` and its sync route ``POST /n``."""
    async with SwitchedRelay.running(db_url) as relay:
        services = build_services(
            Settings(executor_max_workers=1, max_concurrent_executions=4, db_outbox_pool_size=2),
            relay.url,
            node_id="recovering-node",
        )
        _, token = await services.users.create_user("root", instance_admin=True)
        async with (
            running(services),
            serving(create_app(services)) as port,
            httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}",
                headers={"Authorization": f"Bearer {token}"},
                timeout=60,
            ) as http,
        ):
            admin = "/api/v1/admin/apps"
            app = (await http.post(admin, json={"name": "back"})).json()["id"]
            await http.post(f"{admin}/{app}/scripts", json={"name": "count", "source": COUNT})
            route = {"method": "POST", "path": "/n", "script": "count"}
            assert (await http.post(f"{admin}/{app}/routes", json=route)).status_code == 201
            try:
                yield Node(relay, services, http)
            finally:
                relay.come_back()


async def test_a_node_ready_again_serves_its_user_routes(db_url: str) -> None:
    """PostgreSQL away for OUTAGE_SECONDS while requests come (503, or 500 for one
    whose execution it broke off): /readyz says unavailable. Once it is back, /readyz
    says ready within about a second, and from then on the route answers 200, not
    503 while the outbox pool waits out its reconnect backoff."""
    async with node_with_a_route(db_url) as node:
        assert (await node.http.post("/apps/back/n")).json() == {"n": 1}
        node.relay.go_away()
        ends = time.monotonic() + OUTAGE_SECONDS
        down = await node.http.get("/readyz")
        assert down.status_code == 503, down.text
        while time.monotonic() < ends:
            refused = await node.http.post("/apps/back/n")
            assert refused.status_code in (500, 503), refused.text
            await anyio.sleep(0.2)
        node.relay.come_back()
        back = time.monotonic()
        with anyio.fail_after(60):
            while (await node.http.get("/readyz")).status_code != 200:  # noqa: ASYNC110 - polling the node from outside
                await anyio.sleep(0.05)
        ready_after = time.monotonic() - back
        answers = [await node.http.post("/apps/back/n") for _ in range(3)]
        assert [a.status_code for a in answers] == [200] * 3, [a.text for a in answers]
        assert ready_after < SERVES_WITHIN, f"ready {ready_after:.1f} s after PostgreSQL was back"


async def test_readyz_names_an_outbox_pool_that_gives_no_connection(db_url: str) -> None:
    """Every connection of the outbox pool taken (the engine's are free): /readyz
    says so within its bound; given back, it is ready again."""
    async with node_with_a_route(db_url) as node:
        pool = node.services.pool
        held = [await pool.getconn() for _ in range(pool.max_size)]
        try:
            started = time.monotonic()
            r = await node.http.get("/readyz")
            waited = time.monotonic() - started
        finally:
            for conn in held:
                await pool.putconn(conn)
        assert r.status_code == 503
        problems = r.json()["problems"]
        assert problems == [f"outbox pool: no answer within {READY_CHECK_SECONDS:g} s"]
        assert waited < READY_CHECK_SECONDS + 2
        assert (await node.http.get("/readyz")).json() == {"status": "ready"}
