"""A real uvicorn serving an ASGI app inside a test's event loop."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import uvicorn
from starlette.types import ASGIApp


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # the test process keeps its handlers
        yield


@contextlib.asynccontextmanager
async def serving(app: ASGIApp, http: Any = "httptools") -> AsyncIterator[int]:
    """``app`` on 127.0.0.1 with uvicorn's ``http`` protocol, as ``picloud serve``
    runs it (keep-alive timeout the default 5 s); yields the port."""
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        http=http,
        lifespan="off",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    async with serving_config(config) as port:
        yield port


@contextlib.asynccontextmanager
async def serving_config(config: uvicorn.Config) -> AsyncIterator[int]:
    """A uvicorn of ``config`` (port 0: a free one), started; yields its port."""
    server = _Server(config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        with anyio.fail_after(10):
            while not server.started:  # noqa: ASYNC110 - uvicorn has no started event
                await anyio.sleep(0.01)
        yield server.servers[0].sockets[0].getsockname()[1]
        server.should_exit = True
