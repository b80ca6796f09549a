"""On a stop, requests still in progress get uvicorn's graceful window, and the sync
callers still waiting near its end are answered by picloud (``on_stopping``:
``InboxRegistry.stop_waiting``), not cut off by uvicorn's cancellation with a bare
500. Over ``picloud serve``'s own server class and config, on a real socket."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from picloud.cli import STOP_ANSWER_MARGIN_SECONDS, _server_class, uvicorn_config
from picloud.settings import Settings

pytestmark = pytest.mark.anyio
GRACE = 3.0  # the test's graceful window (the product's is GRACEFUL_SHUTDOWN_SECONDS)


async def test_waiting_requests_are_answered_before_the_graceful_window_ends() -> None:
    """A request still waiting when the stop begins is released by ``on_stopping``
    STOP_ANSWER_MARGIN_SECONDS before the window ends, and its own answer is sent."""
    stopping = anyio.Event()
    called: list[float] = []

    def on_stopping() -> None:
        called.append(time.monotonic())
        stopping.set()

    async def wait(request: Request) -> Response:
        await stopping.wait()
        return JSONResponse({"error": {"code": "unavailable"}}, status_code=503)

    config = uvicorn_config(
        Starlette(routes=[Route("/wait", wait)]), Settings(host="127.0.0.1", port=0)
    )
    config.timeout_graceful_shutdown = GRACE
    config.lifespan = "off"
    config.log_level = "error"

    class Server(_server_class(SimpleNamespace(received=None), on_stopping)):  # type: ignore[misc]
        @contextmanager
        def capture_signals(self) -> Iterator[None]:  # the test process keeps its handlers
            yield

    server = Server(config)
    answers: list[httpx.Response] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        with anyio.fail_after(10):
            while not server.started:  # noqa: ASYNC110 - uvicorn has no started event
                await anyio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]

        async def call() -> None:
            async with httpx.AsyncClient(timeout=30) as client:
                answers.append(await client.get(f"http://127.0.0.1:{port}/wait"))

        tg.start_soon(call)
        await anyio.sleep(0.3)  # the request is in
        stop_began = time.monotonic()
        server.should_exit = True
    (answer,) = answers
    assert answer.status_code == 503
    assert answer.json() == {"error": {"code": "unavailable"}}
    (at,) = called
    assert at - stop_began == pytest.approx(GRACE - STOP_ANSWER_MARGIN_SECONDS, abs=0.6)


async def test_nothing_is_called_when_the_requests_end_in_time() -> None:
    """A stop with no request left over never calls ``on_stopping``."""
    called: list[bool] = []
    config = uvicorn_config(Starlette(routes=[]), Settings(host="127.0.0.1", port=0))
    config.timeout_graceful_shutdown = GRACE
    config.lifespan = "off"
    config.log_level = "error"

    class Server(_server_class(SimpleNamespace(received=None), lambda: called.append(True))):  # type: ignore[misc]
        @contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    server = Server(config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        with anyio.fail_after(10):
            while not server.started:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        server.should_exit = True
    await anyio.sleep(GRACE)
    assert called == []
