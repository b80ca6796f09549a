"""Request heads are bounded in bytes and in time (``picloud.http_protocol``).

Over a real in-process uvicorn running the protocol (httptools), on raw sockets;
the time bound shortened by a subclass. One end-to-end test checks that
``picloud serve`` runs it.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import json
import socket
import time
from collections.abc import AsyncIterator, Iterable
from unittest import mock

import anyio
import pytest
import uvicorn
from anyio.abc import SocketStream
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from picloud.cli import uvicorn_config
from picloud.http_protocol import BoundedHttpToolsProtocol
from picloud.settings import Settings
from picloud_shared.limits import (
    HEAD_READ_TIMEOUT_SECONDS,
    MAX_REQUEST_HEAD_BYTES,
    MAX_REQUEST_HEADER_BYTES,
)
from tests import uvicorn_server
from tests.app.server import Server

MIB = 1024 * 1024
QUICK = 0.5  # the time bound of the in-process tests
Answer = tuple[int, dict[str, str], bytes]


class Quick(BoundedHttpToolsProtocol):
    head_read_timeout_seconds = QUICK


class Counting(BoundedHttpToolsProtocol):
    """Counts the bytes the server read off every connection."""

    received = 0

    def data_received(self, data: bytes) -> None:
        Counting.received += len(data)
        super().data_received(data)


def _app() -> Starlette:
    async def echo(request: Request) -> Response:
        body = await request.body()
        return JSONResponse({"headers": len(request.headers), "body": len(body)})

    async def slow(request: Request) -> Response:
        await anyio.sleep(float(request.query_params["s"]))
        return JSONResponse({"slept": True})

    return Starlette(routes=[Route("/echo", echo, methods=["GET", "POST"]), Route("/slow", slow)])


@contextlib.asynccontextmanager
async def serving(protocol: type[HttpToolsProtocol]) -> AsyncIterator[int]:
    """A uvicorn running ``protocol``; its port."""
    async with uvicorn_server.serving(_app(), protocol) as port:
        yield port


def request(head_bytes: int = 0, path: str = "/echo", body: bytes = b"") -> bytes:
    """A POST whose head (request line, headers and the blank line) is exactly
    ``head_bytes`` long (padded with one header), then ``body``."""
    start = f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}"
    if head_bytes:
        start += "\r\nX-Pad: "
        start += "a" * (head_bytes - len(start) - len("\r\n\r\n"))
    return (start + "\r\n\r\n").encode() + body


def parse(data: bytes) -> tuple[Answer, bytes]:
    """The first response in ``data`` (with a Content-Length), and what follows it."""
    top, _, rest = data.partition(b"\r\n\r\n")
    status_line, *lines = top.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    length = int(headers["content-length"])
    return (int(status_line.split()[1]), headers, rest[:length]), rest[length:]


def complete(data: bytes) -> bool:
    """Whether ``data`` holds at least one whole response."""
    if b"\r\n\r\n" not in data:
        return False
    (_, headers, body), _ = parse(data)
    return len(body) == int(headers["content-length"])


async def read_responses(stream: SocketStream, count: int = 1) -> list[Answer]:
    """The next ``count`` responses, on a connection that stays open."""
    data, answers = b"", []
    while len(answers) < count:
        while not complete(data):
            data += await stream.receive()
        answer, data = parse(data)
        answers.append(answer)
    assert data == b""
    return answers


async def read_response(stream: SocketStream) -> Answer:
    return (await read_responses(stream))[0]


async def read_until_closed(stream: SocketStream, timeout: float = 5) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    with anyio.fail_after(timeout):
        while True:
            try:
                data += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionResetError):
                return data


def assert_error(answer: Answer, status: int, code: str, message: str) -> None:
    got_status, headers, body = answer
    assert (got_status, headers["connection"]) == (status, "close")
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {"error": {"code": code, "message": message}}


def fake_transport() -> mock.Mock:
    transport = mock.Mock()
    transport.get_extra_info.return_value = None  # no addresses
    transport.is_closing.return_value = False
    return transport


TOO_LARGE = f"the request line and headers are larger than {MAX_REQUEST_HEAD_BYTES} bytes"


def test_uvicorn_internals_keep_the_shape_the_protocol_relies_on() -> None:
    """The protocol overrides uvicorn internals: if an upgrade of uvicorn renames or
    reshapes them, this says so first (then check picloud/http_protocol.py against
    uvicorn's httptools_impl.py before widening the pin in pyproject.toml)."""
    overridden = {
        "connection_made": ["self", "transport"],
        "connection_lost": ["self", "exc"],
        "data_received": ["self", "data"],
        "on_headers_complete": ["self"],
        "on_message_complete": ["self"],
        "on_response_complete": ["self"],
        "_start_asgi_task": ["self", "cycle", "app"],
    }
    for name, params in overridden.items():
        assert list(inspect.signature(getattr(HttpToolsProtocol, name)).parameters) == params, name
    assert "on_response" in inspect.signature(RequestResponseCycle).parameters
    config = uvicorn.Config(_app(), log_level="warning")
    loop = mock.Mock()
    loop.create_task.side_effect = lambda coroutine: coroutine.close()  # no app runs
    protocol = BoundedHttpToolsProtocol(config, ServerState(), {}, _loop=loop)
    assert protocol.loop is loop
    transport = fake_transport()
    protocol.connection_made(transport)
    assert protocol.transport is transport
    assert protocol.cycle is None
    assert protocol.flow is not None
    protocol.data_received(b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n")
    cycle = protocol.cycle
    assert isinstance(cycle, RequestResponseCycle)
    assert cycle.response_complete is False
    assert cycle.on_response == protocol.on_response_complete
    assert isinstance(protocol.server_state.default_headers, list)


@pytest.mark.anyio
async def test_a_closed_connection_leaves_no_timer() -> None:
    """The head timer starts with the connection and is cancelled when it is lost."""
    config = uvicorn.Config(_app(), log_level="warning")
    protocol = BoundedHttpToolsProtocol(config, ServerState(), {})
    protocol.connection_made(fake_transport())
    timer = protocol._head_timer
    assert timer is not None
    assert timer.when() - protocol.loop.time() == pytest.approx(HEAD_READ_TIMEOUT_SECONDS, abs=1)
    protocol.connection_lost(None)
    assert timer.cancelled()
    assert protocol._head_timer is None


def test_the_limits_leave_picloud_its_own_431() -> None:
    """The head limit is above the user-route header limit: picloud answers a user
    route's headers between the two itself (with the execution_id of its error body)."""
    assert MAX_REQUEST_HEAD_BYTES == 64 * 1024 > MAX_REQUEST_HEADER_BYTES
    assert HEAD_READ_TIMEOUT_SECONDS == 10


@pytest.mark.anyio
async def test_a_head_at_the_limit_is_served_and_one_byte_more_is_431_and_closed() -> None:
    """A head of MAX_REQUEST_HEAD_BYTES reaches the app; one byte more is answered 431
    ``headers_too_large`` with ``Connection: close``, and the connection is closed."""
    async with serving(BoundedHttpToolsProtocol) as port:
        async with await anyio.connect_tcp("127.0.0.1", port) as s:
            await s.send(request(MAX_REQUEST_HEAD_BYTES))
            status, _, body = await read_response(s)
            assert (status, json.loads(body)["body"]) == (200, 0)
        async with await anyio.connect_tcp("127.0.0.1", port) as s:
            await s.send(request(MAX_REQUEST_HEAD_BYTES + 1))
            answer, rest = parse(await read_until_closed(s))
            assert_error(answer, 431, "headers_too_large", TOO_LARGE)
            assert rest == b""


@pytest.mark.anyio
async def test_each_head_of_a_keep_alive_connection_is_counted_on_its_own() -> None:
    """On one connection, heads of the limit each followed by a 200 KiB body are all
    served (neither the bodies nor the earlier heads count); then one byte over is
    the 431."""
    async with (
        serving(BoundedHttpToolsProtocol) as port,
        await anyio.connect_tcp("127.0.0.1", port) as s,
    ):
        for _ in range(3):
            await s.send(request(MAX_REQUEST_HEAD_BYTES, body=b"b" * 200 * 1024))
            status, headers, body = await read_response(s)
            assert (status, json.loads(body)["body"]) == (200, 200 * 1024)
            assert "connection" not in headers
        await s.send(request(MAX_REQUEST_HEAD_BYTES + 1))
        answer, _ = parse(await read_until_closed(s))
        assert_error(answer, 431, "headers_too_large", TOO_LARGE)


def _push(port: int, chunks: Iterable[bytes]) -> tuple[int, bytes]:
    """Send ``chunks`` on a new connection (a blocking socket, in a worker thread)
    until the server stops taking them, then read until it closes: the bytes the
    socket took, and the server's answer (a reset loses none of it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
        sent, data = 0, b""
        with contextlib.suppress(OSError):  # the server's reset
            for chunk in chunks:
                c.sendall(chunk)
                sent += len(chunk)
        with contextlib.suppress(OSError):
            while received := c.recv(65536):
                data += received
    return sent, data


@pytest.mark.anyio
async def test_an_endless_header_is_cut_off_without_being_buffered() -> None:
    """A header line that never ends: the server reads little more than the limit,
    answers 431 and closes; the client cannot send more than the sockets' buffers
    hold (without the bound the server read all 64 MiB)."""
    Counting.received = 0
    endless = itertools.chain(
        [b"GET /echo HTTP/1.1\r\nHost: t\r\nX-Endless: "], itertools.repeat(b"a" * MIB, 64)
    )
    async with serving(Counting) as port:
        sent, data = await anyio.to_thread.run_sync(_push, port, endless)
    assert Counting.received < MAX_REQUEST_HEAD_BYTES + 2 * 256 * 1024
    assert sent < 32 * MIB
    answer, rest = parse(data)
    assert_error(answer, 431, "headers_too_large", TOO_LARGE)
    assert rest == b""


@pytest.mark.anyio
async def test_a_head_past_the_limit_waits_for_the_response_in_progress() -> None:
    """A pipelined head past the limit while a response is in progress: that
    response is sent whole, then the 431, then the connection closes."""
    pipelined = [b"GET /slow?s=0.3 HTTP/1.1\r\nHost: t\r\n\r\n" + request(MIB)]
    async with serving(BoundedHttpToolsProtocol) as port:
        _, data = await anyio.to_thread.run_sync(_push, port, pipelined)
    (status, _, body), rest = parse(data)
    assert (status, json.loads(body)) == (200, {"slept": True})
    answer, rest = parse(rest)
    assert_error(answer, 431, "headers_too_large", TOO_LARGE)
    assert rest == b""


@pytest.mark.anyio
async def test_a_head_arriving_slowly_is_408_and_closed() -> None:
    """Header bytes trickling in (each well within any idle time) past the time
    bound: 408 ``request_timeout``, ``Connection: close``, and the connection closes."""
    async with (
        serving(Quick) as port,
        await anyio.connect_tcp("127.0.0.1", port) as s,
    ):
        started = anyio.current_time()
        await s.send(b"GET /echo HTTP/1.1\r\nHost: t\r\n")

        async def trickle() -> None:
            with contextlib.suppress(anyio.BrokenResourceError, OSError):
                while True:
                    await s.send(b"X-Slow: 1\r\n")
                    await anyio.sleep(QUICK / 10)

        async with anyio.create_task_group() as tg:
            tg.start_soon(trickle)
            data = await read_until_closed(s, timeout=QUICK + 5)
            tg.cancel_scope.cancel()
        assert anyio.current_time() - started >= QUICK
        answer, rest = parse(data)
        assert_error(
            answer,
            408,
            "request_timeout",
            f"the request line and headers did not arrive within {QUICK:g} s",
        )
        assert rest == b""


@pytest.mark.anyio
async def test_a_new_connection_that_sends_nothing_is_closed_without_an_answer() -> None:
    """A connection that sends nothing is closed once the time bound passes; there
    is no request to answer."""
    async with (
        serving(Quick) as port,
        await anyio.connect_tcp("127.0.0.1", port) as s,
    ):
        started = anyio.current_time()
        assert await read_until_closed(s, timeout=QUICK + 3) == b""
        assert anyio.current_time() - started >= QUICK


@pytest.mark.anyio
async def test_a_keep_alive_connection_is_bounded_from_the_end_of_each_response() -> None:
    """After a response, a connection that stays idle is closed when the time bound
    passes (well before uvicorn's 5 s keep-alive), and one that sends part of a head
    is answered 408: the first byte of a request no longer stops the clock."""
    async with serving(Quick) as port:
        for next_bytes in (b"", b"GET /echo HTTP/1.1\r\nHo"):
            async with await anyio.connect_tcp("127.0.0.1", port) as s:
                await s.send(request())
                assert (await read_response(s))[0] == 200
                answered = anyio.current_time()
                if next_bytes:
                    await s.send(next_bytes)
                data = await read_until_closed(s, timeout=QUICK + 3)
                assert anyio.current_time() - answered >= QUICK * 0.9
                if next_bytes:
                    answer, _ = parse(data)
                    message = f"the request line and headers did not arrive within {QUICK:g} s"
                    assert_error(answer, 408, "request_timeout", message)
                else:
                    assert data == b""


@pytest.mark.anyio
async def test_keep_alive_and_pipelined_requests_are_served_as_before() -> None:
    """Several requests on one connection, spaced so that together they take longer
    than the time bound; a request whose app takes longer than it; and a pipelined
    pair behind a slow one: all served, in order, the connection kept."""
    async with (
        serving(Quick) as port,
        await anyio.connect_tcp("127.0.0.1", port) as s,
    ):
        for i in range(6):
            await s.send(request(body=b"x" * i))
            status, _, body = await read_response(s)
            assert (status, json.loads(body)["body"]) == (200, i)
            await anyio.sleep(QUICK / 5)
        await s.send(f"GET /slow?s={QUICK * 2} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        assert (await read_response(s))[0] == 200
        await s.send(
            f"GET /slow?s={QUICK * 2} HTTP/1.1\r\nHost: t\r\n\r\n".encode() + request(body=b"yy")
        )
        first, second = await read_responses(s, 2)
        assert json.loads(first[2]) == {"slept": True}
        assert json.loads(second[2])["body"] == 2
        await s.send(request(body=b"z"))
        assert json.loads((await read_response(s))[2])["body"] == 1


def _read_response(conn: socket.socket) -> Answer:
    data = b""
    while not complete(data):
        data += conn.recv(65536)
    answer, rest = parse(data)
    assert rest == b""
    return answer


def test_picloud_serve_bounds_request_heads(server: Server) -> None:
    """``picloud serve`` runs the bounded protocol: a user-route request whose head is
    just within MAX_REQUEST_HEAD_BYTES gets picloud's own 431 (its headers are past
    32 KiB) and keeps its connection; one byte more gets the protocol's 431 and a
    close; a connection that sends nothing is closed after HEAD_READ_TIMEOUT_SECONDS."""
    host, port = server.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as idle:
        opened = time.monotonic()
        with socket.create_connection((host, int(port)), timeout=30) as c:
            c.sendall(request(MAX_REQUEST_HEAD_BYTES, path="/apps/nope/x"))
            status, headers, body = _read_response(c)
            assert (status, "connection" in headers) == (431, False)
            assert json.loads(body)["error"] == {
                "code": "headers_too_large",
                "message": f"at most 100 request headers of {MAX_REQUEST_HEADER_BYTES} bytes"
                " in all",
                "execution_id": None,
            }
            c.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            assert _read_response(c)[0] == 200
        over = [request(MAX_REQUEST_HEAD_BYTES + 1, path="/apps/nope/x")]
        answer, rest = parse(_push(int(port), over)[1])
        assert_error(answer, 431, "headers_too_large", TOO_LARGE)
        assert rest == b""
        idle.settimeout(HEAD_READ_TIMEOUT_SECONDS + 10)
        assert idle.recv(1) == b""
        assert time.monotonic() - opened >= HEAD_READ_TIMEOUT_SECONDS - 0.5


GET = b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n"


def _limited_config(limit: int, http: str = "picloud") -> uvicorn.Config:
    """``picloud serve``'s uvicorn config with PICLOUD_MAX_CONNECTIONS=limit."""
    config = uvicorn_config(_app(), Settings(host="127.0.0.1", port=0, max_connections=limit))
    config.log_level = "error"  # not uvicorn's "Exceeded concurrency limit" warnings
    if http == "h11":
        config.http = "h11"
    return config


@pytest.mark.anyio
@pytest.mark.parametrize("http", ["picloud", "h11"])
@pytest.mark.parametrize("limit", [1, 2])
async def test_max_connections_busy_connections_are_served_and_one_more_is_503(
    limit: int, http: str
) -> None:
    """With ``picloud serve``'s uvicorn config (and with uvicorn's h11 protocol, whose
    check is the same), PICLOUD_MAX_CONNECTIONS=N serves N open connections, however
    many requests each sends; while all N run a request, a request on one connection
    more is answered 503 and closed: picloud's error body with ``Retry-After`` (h11:
    uvicorn's plain one)."""
    slow = b"GET /slow?s=1.5 HTTP/1.1\r\nHost: t\r\n\r\n"
    async with (
        uvicorn_server.serving_config(_limited_config(limit, http)) as port,
        contextlib.AsyncExitStack() as stack,
    ):
        streams = [
            await stack.enter_async_context(await anyio.connect_tcp("127.0.0.1", port))
            for _ in range(limit)
        ]
        for stream in streams:  # every connection is known to be open and served
            await stream.send(GET)
            assert (await read_response(stream))[0] == 200
        for stream in streams:
            await stream.send(slow)
        await anyio.sleep(0.3)  # every one is running its request
        async with await anyio.connect_tcp("127.0.0.1", port) as extra:
            await extra.send(GET)
            (status, headers, body), _ = parse(await read_until_closed(extra))
        assert (status, headers["connection"]) == (503, "close")
        if http == "h11":
            assert body == b"Service Unavailable"
            assert headers["content-type"] == "text/plain; charset=utf-8"
        else:
            assert json.loads(body)["error"]["code"] == "unavailable"
            assert headers["content-type"] == "application/json"
            assert headers["retry-after"] == "1"
        for stream in streams:
            assert (await read_response(stream))[0] == 200


@pytest.mark.anyio
async def test_a_connection_past_the_limit_closes_the_longest_idle_one() -> None:
    """At PICLOUD_MAX_CONNECTIONS, a new connection is served: the connection that has
    waited longest for its next request is closed to make room, the others stay."""
    async with (
        uvicorn_server.serving_config(_limited_config(2)) as port,
        contextlib.AsyncExitStack() as stack,
    ):
        streams = []
        for _ in range(2):
            stream = await stack.enter_async_context(await anyio.connect_tcp("127.0.0.1", port))
            await stream.send(GET)
            assert (await read_response(stream))[0] == 200
            streams.append(stream)
        async with await anyio.connect_tcp("127.0.0.1", port) as extra:
            await extra.send(GET)
            assert (await read_response(extra))[0] == 200
        assert await read_until_closed(streams[0]) == b""  # the oldest idle: closed
        await streams[1].send(GET)
        assert (await read_response(streams[1]))[0] == 200


@pytest.mark.anyio
async def test_connections_trickling_their_heads_cannot_lock_others_out() -> None:
    """Clients holding every connection with a head sent a byte at a time (slowloris)
    do not keep a new client out: its connection closes the oldest of theirs."""
    limit = 3
    async with (
        uvicorn_server.serving_config(_limited_config(limit)) as port,
        contextlib.AsyncExitStack() as stack,
    ):
        trickling = []
        for _ in range(limit):
            stream = await stack.enter_async_context(await anyio.connect_tcp("127.0.0.1", port))
            await stream.send(b"GET /echo HTTP/1.1\r\nHost: t\r\nX-Slow: a")
            trickling.append(stream)
            await anyio.sleep(0.05)
        async with await anyio.connect_tcp("127.0.0.1", port) as client:
            await client.send(GET)
            assert (await read_response(client))[0] == 200
        assert await read_until_closed(trickling[0]) == b""  # the oldest: closed
        await trickling[1].send(b"\r\n\r\n")  # the others are still served
        assert (await read_response(trickling[1]))[0] == 200
