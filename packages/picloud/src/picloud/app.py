"""The ASGI application: admin API, user routes, health, readiness and metrics."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from psycopg_pool import PoolTimeout
from sqlalchemy import text
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from manager_core.api import AdminDeps, admin_mount
from manager_core.statement_wait import STATEMENT_WAIT_SECONDS, statement_wait
from picloud import metrics
from picloud.services import Services, running
from picloud_shared.errors import MethodNotAllowed, NotFound, PicloudError

log = logging.getLogger("picloud")

ADMIN_PREFIX = "/api/v1/admin"
READY_CHECK_SECONDS = metrics.DEPTH_READ_TIMEOUT_SECONDS


def admin_deps(services: Services) -> AdminDeps:
    return AdminDeps(
        users=services.users,
        apps=services.apps,
        scripts=services.scripts,
        routes=services.routes,
        triggers=services.triggers,
        kv=services.kv,
        documents=services.docs,
        executions=services.executions,
        dead_letters=services.dead_letters,
    )


class BoundedStatements:
    """Every HTTP request runs inside :func:`~manager_core.statement_wait.statement_wait`
    (``seconds``): a PostgreSQL that stops answering costs the admin API and user
    routes a 503 (``unavailable``, with ``Retry-After``), not a request that never
    ends. The lifespan is left out: the dispatcher and the node's other tasks started
    there keep their own ways of riding out an outage (an execution may wait on a row
    lock as long as a script runs)."""

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self._app = app
        self._seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        with statement_wait(self._seconds):
            await self._app(scope, receive, send)


async def unrouted(request: Request, exc: Exception) -> Response:
    """A path no route has (404), or a method a fixed route does not take (405), in
    the API's error shape rather than starlette's plain text."""
    assert isinstance(exc, HTTPException)
    error: PicloudError
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow")
        only = f" (only {allowed})" if allowed else ""
        error = MethodNotAllowed(f"{request.method} is not allowed here{only}")
    else:
        error = NotFound(
            "no such path: user routes are under /apps/{app_name}/..., "
            f"the admin API under {ADMIN_PREFIX}/..."
        )
    return JSONResponse({"error": error.to_wire()}, error.http_status, headers=exc.headers)


def create_app(
    services: Services, *, statement_wait_seconds: float = STATEMENT_WAIT_SECONDS
) -> Starlette:
    """The whole HTTP surface of a node. Its lifespan runs the executor and dispatcher.
    ``statement_wait_seconds``: how long a request's statement goes without an answer
    before PostgreSQL is asked whether it is working on it (:class:`BoundedStatements`)."""

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def engine_answers() -> None:
        async with services.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def pool_answers() -> None:
        async with services.pool.connection(timeout=READY_CHECK_SECONDS) as conn:
            await conn.execute("SELECT 1")

    async def readyz(request: Request) -> Response:
        # Both pools the node serves with: the engine's (admin API, executions) and the
        # outbox pool (every user-route request, claims, completions), which reconnects
        # on its own schedule. Each is bounded as /metrics' depth read is: a PostgreSQL
        # that hangs without closing its connections answers no statement, nor refuses
        # one. The outbox pool opens with the node: before, the dispatcher says it all.
        probes = {"database": engine_answers}
        if not services.pool.closed:
            probes["outbox pool"] = pool_answers
        found: dict[str, str] = {}

        async def probe(name: str) -> None:
            try:
                with anyio.fail_after(READY_CHECK_SECONDS):
                    await probes[name]()
            except (TimeoutError, PoolTimeout):
                found[name] = f"{name}: no answer within {READY_CHECK_SECONDS:g} s"
            except Exception as exc:
                found[name] = f"{name}: {type(exc).__name__}"

        async with anyio.create_task_group() as tg:
            for name in probes:
                tg.start_soon(probe, name)
        problems = [found[name] for name in probes if name in found]
        if not services.dispatcher.ready:
            problems.append("dispatcher: not running")
        if problems:
            return JSONResponse({"status": "unavailable", "problems": problems}, status_code=503)
        return JSONResponse({"status": "ready"})

    depth = metrics.OutboxDepth()

    async def metrics_endpoint(request: Request) -> Response:
        return PlainTextResponse(
            await metrics.render(services, depth),
            media_type="text/plain; version=0.0.4; charset=utf-8",
        )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with running(services):
            log.info("picloud node %s ready", services.node_id)
            yield
        log.info("picloud node %s stopped", services.node_id)

    return Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
            admin_mount(admin_deps(services), ADMIN_PREFIX),
            *services.orchestrator.routes(),
        ],
        lifespan=lifespan,
        middleware=[Middleware(BoundedStatements, seconds=statement_wait_seconds)],
        exception_handlers={404: unrouted, 405: unrouted},
    )
