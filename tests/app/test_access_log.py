"""The access log (``PICLOUD_ACCESS_LOG``): one line per request, no query string,
nothing unprintable, off by default. Over a real uvicorn with ``picloud serve``'s
config, on raw sockets."""

from __future__ import annotations

import logging
import re

import anyio
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from orchestrator_core.routes import EXECUTION_ID_STATE
from picloud.access_log import AccessLog, printable
from picloud.cli import uvicorn_config
from picloud.settings import Settings
from tests import uvicorn_server

pytestmark = pytest.mark.anyio


async def _hello(request: Request) -> Response:
    return PlainTextResponse("hi", status_code=201)


async def _boom(request: Request) -> Response:
    raise RuntimeError("boom")


async def _ran(request: Request) -> Response:
    setattr(request.state, EXECUTION_ID_STATE, "0b6f0000-0000-4000-8000-000000000001")
    return Response(status_code=202)


def _app() -> Starlette:
    return Starlette(
        routes=[
            Route("/hello/{rest:path}", _hello, methods=["GET", "POST"]),
            Route("/boom", _boom),
            Route("/ran", _ran),
        ]
    )


async def _get(port: int, target: bytes) -> bytes:
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(b"GET " + target + b" HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        data = b""
        with anyio.fail_after(10):
            while chunk := await stream.receive(65536):
                data += chunk
                if b"\r\n\r\n" in data:
                    break
    return data.split(b" ", 2)[1]


async def _lines(caplog: pytest.LogCaptureFixture, targets: list[bytes], *, on: bool) -> list[str]:
    config = uvicorn_config(_app(), Settings(host="127.0.0.1", port=0, access_log=on))
    config.log_level = "error"
    with caplog.at_level(logging.INFO, logger="picloud.access"):
        async with uvicorn_server.serving_config(config) as port:
            for target in targets:
                await _get(port, target)
    return [r.getMessage() for r in caplog.records if r.name == "picloud.access"]


async def test_each_request_is_one_line_without_its_query(caplog: pytest.LogCaptureFixture) -> None:
    """Client, method, the path as sent, status and time; the query string is left out."""
    (line,) = await _lines(caplog, [b"/hello/a%20b?token=s3cret"], on=True)
    match = re.fullmatch(r'127\.0\.0\.1:\d+ "GET /hello/a%20b" 201 (\d+\.\d) ms', line)
    assert match is not None, line
    assert "s3cret" not in line


async def test_a_user_routes_execution_is_named(caplog: pytest.LogCaptureFixture) -> None:
    """The execution a request wrote (``scope["state"]``) ends its line."""
    (line,) = await _lines(caplog, [b"/ran"], on=True)
    assert re.fullmatch(
        r'\S+ "GET /ran" 202 \d+\.\d ms execution=0b6f0000-0000-4000-8000-0+1', line
    )


async def test_an_app_failure_is_logged_as_500(caplog: pytest.LogCaptureFixture) -> None:
    """A request whose handler raised is logged with the 500 it was answered."""
    lines = await _lines(caplog, [b"/boom"], on=True)
    assert [line.split('"')[2].split()[0] for line in lines] == ["500"]


async def test_no_line_when_it_is_off(caplog: pytest.LogCaptureFixture) -> None:
    """Off (the default), nothing is written to ``picloud.access``."""
    assert Settings().access_log is False
    assert await _lines(caplog, [b"/hello/x", b"/boom"], on=False) == []


async def test_a_path_cannot_forge_a_line(caplog: pytest.LogCaptureFixture) -> None:
    """A quote or backslash in a path (the HTTP parser lets them through) is written
    ``\\xNN``: no quote ends the field early. (The parser refuses control bytes and
    non-ASCII; ``printable`` escapes those too, below.)"""
    (line,) = await _lines(caplog, [b'/hello/a"b\\c'], on=True)
    assert '"GET /hello/a\\x22b\\x5cc" 201 ' in line


def test_printable_escapes_everything_else() -> None:
    """Every byte from 0 to 255 is either itself (printable ASCII) or ``\\xNN``."""
    out = printable(bytes(range(256)))
    assert out.isascii()
    assert out.isprintable()
    assert " " not in out
    assert out.count("\\x") == 256 - (0x7F - 0x21) + 2  # the quote and backslash too


async def test_lifespan_passes_through() -> None:
    """Scopes other than http reach the app untouched, and write nothing."""
    seen: list[str] = []

    async def app(scope: dict, receive: object, send: object) -> None:
        seen.append(scope["type"])

    logger = logging.getLogger("picloud.access.test")
    await AccessLog(app, logger)({"type": "lifespan"}, None, None)
    assert seen == ["lifespan"]


async def test_a_raw_app_that_raises_before_answering_is_logged_as_500(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An exception that leaves no response started is logged as the 500 the HTTP
    server then sends; a request that ends with no response at all as ``-``."""

    async def raising(scope: dict, receive: object, send: object) -> None:
        raise RuntimeError("boom")

    async def silent(scope: dict, receive: object, send: object) -> None:
        return None

    scope = {"type": "http", "method": "GET", "raw_path": b"/x", "client": ("10.0.0.1", 5)}
    with caplog.at_level(logging.INFO, logger="picloud.access"):
        with pytest.raises(RuntimeError):
            await AccessLog(raising)(scope, None, None)
        await AccessLog(silent)(scope, None, None)
    lines = [r.getMessage() for r in caplog.records if r.name == "picloud.access"]
    assert [line.split(" ms")[0].rsplit(" ", 1)[0] for line in lines] == [
        '10.0.0.1:5 "GET /x" 500',
        '10.0.0.1:5 "GET /x" -',
    ]
