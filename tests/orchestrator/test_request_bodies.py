"""User-route request bodies: what a node holds of them, and for how long.

Over httpx's ASGI transport where the HTTP server is not the point; over a real
uvicorn (httptools, as ``picloud serve`` runs it) and raw sockets where it is: a
body that arrives slowly, a connection closed after an early answer.
"""

from __future__ import annotations

import contextlib
import functools
import json
import threading
from collections.abc import AsyncIterator
from typing import Any

import anyio
import attrs
import httpx
import pytest
from anyio.abc import SocketStream
from starlette.applications import Starlette

from orchestrator_core import routes
from orchestrator_core.body_budget import BodyBudget
from orchestrator_core.inbox import InboxRegistry
from orchestrator_core.request_body import PARSE_IN_THREAD_BYTES, PARSED_JSON_SHARE
from orchestrator_core.routes import UserRouteOrchestrator
from picloud_shared.domain import DispatchMode
from picloud_shared.gate import ExecutionGate
from picloud_shared.limits import (
    BODY_BUDGET_WAIT_SECONDS,
    BODY_READ_TIMEOUT_SECONDS,
    BODY_SLOT_HOLD_SECONDS,
    MAX_BODY_BYTES_IN_FLIGHT,
)
from tests import uvicorn_server
from tests.orchestrator.test_user_routes import FakeOutbox, FakeRoutes, target

pytestmark = pytest.mark.anyio
SYNC, ASYNC = "/apps/shop/orders/1", "/apps/shop/jobs"
BOTH = pytest.mark.parametrize("path", [SYNC, ASYNC], ids=["sync", "async"])


@attrs.define
class Wired:
    client: httpx.AsyncClient
    outbox: FakeOutbox
    gate: ExecutionGate
    orch: UserRouteOrchestrator

    def assert_holds_nothing(self) -> None:
        """No execution slot and no byte of the body budget is still held."""
        assert self.gate.free == self.gate.capacity
        assert self.orch.body_budget.in_use == 0


@contextlib.asynccontextmanager
async def wired(**settings: Any) -> AsyncIterator[Wired]:
    """An orchestrator (4 gate slots) with a sync and an async route, and a client."""
    inbox, gate = InboxRegistry(), ExecutionGate(4)
    routes = FakeRoutes(
        [
            target("POST", "/orders/{order_id}", timeout=5),
            target("POST", "/jobs", DispatchMode.ASYNC),
        ]
    )
    async with anyio.create_task_group() as tg:
        outbox = FakeOutbox(inbox, tg)
        orch = UserRouteOrchestrator(
            routes, outbox, inbox, gate, node_id="n1", admission_wait_seconds=0.2, **settings
        )
        transport = httpx.ASGITransport(app=Starlette(routes=orch.routes()))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield Wired(client, outbox, gate, orch)


@contextlib.asynccontextmanager
async def serving(orch: UserRouteOrchestrator) -> AsyncIterator[int]:
    """The orchestrator's routes on a real uvicorn, as ``picloud serve`` runs it; the port."""
    async with uvicorn_server.serving(Starlette(routes=orch.routes())) as port:
        yield port


def head(path: str, length: int) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


async def read_response(stream: SocketStream) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length: status, headers, body."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += await stream.receive()
    top, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = top.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    while len(body) < int(headers["content-length"]):
        body += await stream.receive()
    return int(status_line.split()[1]), headers, body


async def closed_by_server(stream: SocketStream) -> bool:
    with anyio.fail_after(5):
        try:
            await stream.receive()
        except anyio.EndOfStream:
            return True
    return False


async def wait_until(check: Any, timeout: float = 5) -> None:
    with anyio.fail_after(timeout):
        while not check():  # noqa: ASYNC110 - polling the node's counters
            await anyio.sleep(0.005)


async def test_the_node_wide_defaults_are_the_named_limits() -> None:
    async with wired() as w:
        assert w.orch.body_budget.capacity == MAX_BODY_BYTES_IN_FLIGHT == 64 * 1024 * 1024
        assert w.orch.body_budget_wait_seconds == BODY_BUDGET_WAIT_SECONDS
        assert w.orch.body_read_timeout_seconds == BODY_READ_TIMEOUT_SECONDS == 30
        assert w.orch.body_slot_hold_seconds == BODY_SLOT_HOLD_SECONDS


async def test_a_sync_request_the_gate_refuses_never_has_its_body_read() -> None:
    """Admission comes first: a request refused with 503 costs no body (not a byte is
    read, let alone parsed), and its connection is closed rather than drained."""
    async with wired() as w:
        held = [w.gate.try_acquire() for _ in range(w.gate.capacity)]
        pulled: list[bytes] = []

        async def body() -> AsyncIterator[bytes]:
            pulled.append(b"[{},{}]")
            yield b"[{},{}]"

        r = await w.client.post(SYNC, content=body(), headers={"content-type": "application/json"})
        assert (r.status_code, pulled) == (503, [])
        assert r.json()["error"]["code"] == "overloaded"
        assert (r.headers["retry-after"], r.headers["connection"]) == ("1", "close")
        assert w.outbox.rows == []
        for permit in held:
            assert permit is not None
            permit.release()
        w.assert_holds_nothing()


@pytest.mark.parametrize("probe", [SYNC, ASYNC], ids=["sync", "async"])
@pytest.mark.parametrize("length", ["declared", "streamed"])
async def test_bodies_in_flight_on_a_node_are_bounded_by_the_budget(
    length: str, probe: str
) -> None:
    """While one request holds 600 bytes of a 1000-byte budget (the bytes it has sent
    so far, whether it declared 900 or no length), a 400-byte body still fits exactly
    and one of 401 is refused with 503 ``overloaded`` and Retry-After. The share is
    given back once the row is written."""
    async with wired(body_budget=BodyBudget(1000), body_budget_wait_seconds=0.1) as w:
        go_on = anyio.Event()

        async def slow_body() -> AsyncIterator[bytes]:
            yield b"a" * 600
            await go_on.wait()
            if length == "declared":
                yield b"a" * 300

        headers = {"content-length": "900"} if length == "declared" else {}
        answers: list[int] = []

        async def holder() -> None:
            r = await w.client.post(ASYNC, content=slow_body(), headers=headers)
            answers.append(r.status_code)

        async with anyio.create_task_group() as tg:
            tg.start_soon(holder)
            await wait_until(lambda: w.orch.body_budget.in_use == 600)
            fits = await w.client.post(probe, content=b"b" * 400)
            assert fits.status_code == (200 if probe == SYNC else 202)
            over = await w.client.post(probe, content=b"b" * 401)
            assert over.status_code == 503
            assert over.json()["error"]["code"] == "overloaded"
            assert over.headers["retry-after"] == "1"
            assert over.headers["connection"] == "close"
            go_on.set()
        assert answers == [202]
        assert len(w.outbox.rows) == 2
        w.assert_holds_nothing()


@BOTH
async def test_a_json_body_holds_a_larger_share_while_it_is_parsed(path: str) -> None:
    """A JSON body is held parsed until its row is written: its share grows to
    PARSED_JSON_SHARE times its size first. With 1000 bytes of budget and 300 held
    by a slow body, a 100-byte JSON body needs 800 and is refused with 503, the same
    100 bytes as text are not; once the slow body is done the JSON one fits."""
    assert PARSED_JSON_SHARE == 8
    async with wired(body_budget=BodyBudget(1000), body_budget_wait_seconds=0.1) as w:
        go_on = anyio.Event()

        async def slow_body() -> AsyncIterator[bytes]:
            yield b"a" * 300
            await go_on.wait()

        json_body = b"[" + b"0," * 48 + b"0 ]"
        assert len(json_body) == 100
        as_json = {"content-type": "application/json"}
        accepted = 200 if path == SYNC else 202
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(w.client.post, ASYNC, content=slow_body()))
            await wait_until(lambda: w.orch.body_budget.in_use == 300)
            over = await w.client.post(path, content=json_body, headers=as_json)
            assert over.status_code == 503
            assert over.json()["error"]["code"] == "overloaded"
            text = await w.client.post(path, content=json_body)
            assert text.status_code == accepted
            # 700 free: a JSON body of 87 bytes (696) fits, one of 88 (704) does not.
            edge = b'"' + b"a" * 85 + b'"'
            assert (await w.client.post(path, content=edge, headers=as_json)).status_code == (
                accepted
            )
            edge_over = b'"' + b"a" * 86 + b'"'
            assert (
                await w.client.post(path, content=edge_over, headers=as_json)
            ).status_code == 503
            go_on.set()
        assert (await w.client.post(path, content=json_body, headers=as_json)).status_code == (
            accepted
        )
        w.assert_holds_nothing()


@BOTH
async def test_a_declared_length_holds_nothing_before_its_bytes_come(path: str) -> None:
    """A request that declares 1000 bytes and sends none holds nothing of the budget:
    a client cannot reserve it with headers alone."""
    async with wired(body_budget=BodyBudget(1000), body_budget_wait_seconds=0.1) as w:
        go_on = anyio.Event()

        async def late_body() -> AsyncIterator[bytes]:
            await go_on.wait()
            yield b"a" * 1000

        async with anyio.create_task_group() as tg:
            tg.start_soon(
                functools.partial(
                    w.client.post, path, content=late_body(), headers={"content-length": "1000"}
                )
            )
            await anyio.wait_all_tasks_blocked()
            assert w.orch.body_budget.in_use == 0
            whole = await w.client.post(path, content=b"b" * 1000)
            assert whole.status_code == (200 if path == SYNC else 202)
            go_on.set()
        w.assert_holds_nothing()


async def test_a_sync_request_waits_for_its_answer_holding_no_body() -> None:
    """The body's share is given back once its row is written: the wait for the
    script's answer holds the execution slot, not the body."""
    async with wired() as w:
        w.outbox.delay = 0.3
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(w.client.post, SYNC, content=b"a" * 5000))
            await wait_until(lambda: w.outbox.rows)
            assert w.orch.body_budget.in_use == 0
            assert w.gate.in_use == 1
        w.assert_holds_nothing()


async def _broken_body() -> AsyncIterator[bytes]:
    yield b"a"
    raise RuntimeError("the client's stream broke")


async def _too_long() -> AsyncIterator[bytes]:
    yield b"a" * 400  # within the budget's 500
    yield b"a" * 601  # 1001 in all: past the 1000-byte limit


REFUSED_AFTER_ADMISSION = {
    "413 declared": ({"content": b"a" * 1001}, 413, "payload_too_large"),
    "413 streamed": ({"content": _too_long}, 413, "payload_too_large"),
    "422 unparsable JSON": (
        {"content": b"{nope", "headers": {"content-type": "application/json"}},
        422,
        "rejected",
    ),
    "503 no room in the budget": ({"content": b"a" * 501}, 503, "overloaded"),
    "500 an exception": ({"content": _broken_body}, 500, "internal"),
    "431 too many headers": (
        {"content": b"a", "headers": {f"x-{i}": "1" for i in range(200)}},
        431,
        "headers_too_large",
    ),
}


@pytest.mark.parametrize(
    ("request_kwargs", "status", "code"),
    REFUSED_AFTER_ADMISSION.values(),
    ids=REFUSED_AFTER_ADMISSION.keys(),
)
async def test_a_sync_request_refused_after_admission_gives_its_slot_back(
    request_kwargs: dict[str, Any], status: int, code: str
) -> None:
    """Whatever refuses a sync request once it holds a slot, the slot and the body's
    share go back, and nothing is written."""
    async with wired(max_body_bytes=1000, body_budget=BodyBudget(500)) as w:
        kwargs = dict(request_kwargs)
        if callable(kwargs["content"]):
            kwargs["content"] = kwargs["content"]()
        r = await w.client.post(SYNC, **kwargs)
        assert r.status_code == status
        assert r.json()["error"]["code"] == code
        assert w.outbox.rows == []
        w.assert_holds_nothing()


async def test_a_sync_request_whose_client_goes_gives_its_slot_back() -> None:
    """A client gone while its body is read: nothing sent (no one to send it to),
    nothing written, nothing held."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": SYNC,
        "raw_path": SYNC.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-length", b"10")],
        "server": ("test", 80),
    }
    async with wired() as w:
        await Starlette(routes=w.orch.routes())(scope, receive, send)  # type: ignore[arg-type]
        assert sent == []
        assert w.outbox.rows == []
        w.assert_holds_nothing()


@BOTH
async def test_a_body_not_whole_within_the_read_timeout_is_408_and_nothing_runs(
    path: str,
) -> None:
    """A body whose last byte comes at half the read timeout is served; one that is
    not whole when it passes is answered 408 ``request_timeout`` (the usual error
    body), its connection is closed, nothing is written and nothing stays held."""
    timeout = 1.0
    async with wired(body_read_timeout_seconds=timeout) as w, serving(w.orch) as port:
        async with await anyio.connect_tcp("127.0.0.1", port) as s:
            await s.send(head(path, 10) + b"12345")
            await anyio.sleep(timeout / 2)
            await s.send(b"67890")
            status, _, _ = await read_response(s)
            assert status == (200 if path == SYNC else 202)
        assert len(w.outbox.rows) == 1
        async with await anyio.connect_tcp("127.0.0.1", port) as s:
            started = anyio.current_time()
            await s.send(head(path, 10) + b"12345")
            with anyio.fail_after(timeout + 5):
                status, headers, body = await read_response(s)
            assert anyio.current_time() - started >= timeout
            assert status == 408
            assert json.loads(body) == {
                "error": {
                    "code": "request_timeout",
                    "message": "the request body did not arrive within 1 s",
                    "execution_id": None,
                }
            }
            assert headers["connection"] == "close"
            assert await closed_by_server(s)
        assert len(w.outbox.rows) == 1
        w.assert_holds_nothing()


async def test_a_slow_sync_body_gives_its_slot_back_and_is_served_once_whole() -> None:
    """A sync request whose body is still arriving after ``body_slot_hold_seconds``
    gives its execution slot back (a slow client cannot keep the node's slots), and
    is admitted again, slot handed to its row, once the body is whole."""
    async with (
        wired(body_slot_hold_seconds=0.2, body_read_timeout_seconds=10) as w,
        serving(w.orch) as port,
    ):
        async with await anyio.connect_tcp("127.0.0.1", port) as s:
            await s.send(head(SYNC, 10) + b"12345")
            await wait_until(lambda: w.gate.in_use == 1)  # admitted
            await wait_until(lambda: w.gate.in_use == 0, timeout=2)  # given back
            assert w.outbox.rows == []
            assert w.orch.body_budget.in_use == 5  # the bytes it has sent
            await s.send(b"67890")
            status, _, body = await read_response(s)
        assert (status, json.loads(body)) == (200, {"ok": True})
        (held,) = w.outbox.permits
        assert held is not None
        w.assert_holds_nothing()


@BOTH
async def test_a_large_body_is_parsed_off_the_event_loop(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A body over PARSE_IN_THREAD_BYTES is parsed (and its event built) on a worker
    thread, so a large JSON body does not stall the node's other requests; one of
    exactly that size stays on the event loop."""
    assert PARSE_IN_THREAD_BYTES == 64 * 1024
    threads: list[bool] = []
    build = routes.http_event

    def recording(*args: Any) -> Any:
        threads.append(threading.current_thread() is threading.main_thread())
        return build(*args)

    monkeypatch.setattr(routes, "http_event", recording)
    as_json = {"content-type": "application/json"}
    async with wired() as w:
        for size in (PARSE_IN_THREAD_BYTES, PARSE_IN_THREAD_BYTES + 1):
            body = b'"' + b"a" * (size - 2) + b'"'
            r = await w.client.post(path, content=body, headers=as_json)
            assert r.status_code == (200 if path == SYNC else 202), r.text
        w.assert_holds_nothing()
    assert threads == [True, False]  # on the loop (the main thread), then not
