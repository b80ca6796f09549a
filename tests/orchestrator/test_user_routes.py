"""The user-route orchestrator over an in-memory route table and outbox.

The real outbox, dispatcher and executor are exercised end to end by
``tests/app``; here the point is the HTTP behaviour of the orchestrator itself.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Sequence

import anyio
import httpx
import pytest
from starlette.applications import Starlette

from orchestrator_core.inbox import InboxRegistry
from orchestrator_core.routes import DISCONNECT_WATCH_AFTER, UserRouteOrchestrator
from picloud_shared import wire
from picloud_shared.domain import DispatchMode, RouteTarget
from picloud_shared.errors import Unavailable
from picloud_shared.events import HttpEvent
from picloud_shared.execution import ScriptResponse
from picloud_shared.gate import ExecutionGate, Permit
from picloud_shared.ids import AppId, RouteId, ScriptId
from picloud_shared.inbox import InboxResult
from picloud_shared.limits import (
    MAX_REQUEST_BODY_BYTES,
    MAX_REQUEST_HEADER_BYTES,
    MAX_REQUEST_HEADERS,
)
from picloud_shared.outbox import HttpDispatchPayload, NewOutboxRow, OutboxSourceKind
from picloud_shared.status import InboxFailureKind

pytestmark = pytest.mark.anyio
APP = AppId(uuid.uuid4())


def target(
    method: str, path: str, mode: DispatchMode = DispatchMode.SYNC, timeout: int = 1
) -> RouteTarget:
    return RouteTarget(
        RouteId(uuid.uuid4()), APP, "shop", method, path, mode, ScriptId(uuid.uuid4()), timeout
    )


class FakeRoutes:
    def __init__(self, targets: list[RouteTarget]) -> None:
        self.targets = targets

    async def routes_for_app(self, app_name: str) -> Sequence[RouteTarget] | None:
        return self.targets if app_name == "shop" else None


Answer = Callable[[NewOutboxRow], InboxResult | None]


class FakeOutbox:
    """Records rows; answers sync rows through the inbox like a dispatcher would."""

    def __init__(self, inbox: InboxRegistry, tg: anyio.abc.TaskGroup) -> None:
        self.rows: list[NewOutboxRow] = []
        self.inbox = inbox
        self.tg = tg
        self.answer: Answer = lambda row: InboxResult(
            row.execution_id, response=ScriptResponse.json({"ok": True})
        )
        self.delivery_statuses: list[str] = []
        self.delay = 0.01  # seconds from enqueue to the answer
        self.permits: list[Permit | None] = []  # what each enqueue was handed

    async def enqueue(self, row: NewOutboxRow, *, permit: Permit | None = None) -> None:
        self.rows.append(row)
        self.permits.append(permit)
        result = self.answer(row) if row.reply_to is not None else None
        if result is not None:
            self.tg.start_soon(self._deliver, row, result, permit)
        elif permit is not None:
            permit.release()

    async def _deliver(self, row: NewOutboxRow, result: InboxResult, permit: Permit | None) -> None:
        """The script "runs" holding the request's slot, like the dispatcher."""
        await anyio.sleep(self.delay)
        if permit is not None:
            permit.release()
        assert row.reply_to is not None
        status = await self.inbox.deliver(row.reply_to, result)
        self.delivery_statuses.append(status.value)


@pytest.fixture
async def env() -> AsyncIterator[tuple[httpx.AsyncClient, FakeOutbox, FakeRoutes, ExecutionGate]]:
    inbox = InboxRegistry()
    gate = ExecutionGate(4)
    routes = FakeRoutes(
        [
            target("GET", "/hello"),
            target("POST", "/orders/{order_id}"),
            target("POST", "/jobs", DispatchMode.ASYNC),
        ]
    )
    async with anyio.create_task_group() as tg:
        outbox = FakeOutbox(inbox, tg)
        orch = UserRouteOrchestrator(
            routes, outbox, inbox, gate, node_id="n1", admission_wait_seconds=0.2
        )
        app = Starlette(routes=orch.routes())
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://test"
        ) as client:
            yield client, outbox, routes, gate


async def test_sync_route_answers_with_the_script_response(env) -> None:  # type: ignore[no-untyped-def]
    """A sync route waits for the inbox and answers with the script's response."""
    client, outbox, _, _ = env
    r = await client.get("/apps/shop/hello?x=1")
    assert r.status_code == 200
    assert r.json() == {"ok": True}
    assert r.headers["content-type"] == "application/json"
    (row,) = outbox.rows
    assert row.source_kind is OutboxSourceKind.HTTP
    assert row.reply_to is not None
    assert row.reply_node == "n1"
    event = HttpEvent.from_wire(HttpDispatchPayload.from_wire(row.payload).event)
    assert (event.method, event.path, event.query) == ("GET", "/hello", {"x": "1"})


async def test_path_params_and_json_body_reach_the_event(env) -> None:  # type: ignore[no-untyped-def]
    """{order_id} binds, and an application/json body is parsed into event.json."""
    client, outbox, _, _ = env
    r = await client.post("/apps/shop/orders/42", json={"qty": 2})
    assert r.status_code == 200
    event = HttpDispatchPayload.from_wire(outbox.rows[0].payload).event
    assert event["params"] == {"order_id": "42"}
    assert event["json"] == {"qty": 2}
    assert event["body"] == '{"qty":2}' or event["body"].replace(" ", "") == '{"qty":2}'


async def test_unparsable_json_is_422_without_running_anything(env) -> None:  # type: ignore[no-untyped-def]
    """A body that claims JSON but is not is rejected before dispatch."""
    client, outbox, _, _ = env
    r = await client.post(
        "/apps/shop/orders/1", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "rejected"
    assert outbox.rows == []


async def test_body_over_the_cap_is_413_and_at_the_cap_is_accepted(env) -> None:  # type: ignore[no-untyped-def]
    """The request body limit sits exactly at 1 MiB."""
    client, outbox, _, _ = env
    ok = await client.post("/apps/shop/orders/1", content=b"a" * MAX_REQUEST_BODY_BYTES)
    assert ok.status_code == 200
    big = await client.post("/apps/shop/orders/1", content=b"a" * (MAX_REQUEST_BODY_BYTES + 1))
    assert big.status_code == 413
    assert len(outbox.rows) == 1


@pytest.mark.parametrize("path", ["/apps/shop/orders/1", "/apps/shop/jobs"], ids=["sync", "async"])
async def test_a_json_body_is_bounded_as_postgres_keeps_it(env, path: str) -> None:  # type: ignore[no-untyped-def]
    """``1e300`` is 6 bytes of body but 301 digits as stored: a JSON body whose numbers,
    written out, pass the 1 MiB limit is 413 before anything is written; the same body
    sent as text (stored as a string, not parsed) is taken."""
    client, outbox, _, _ = env
    count = MAX_REQUEST_BODY_BYTES // 302  # "1000…0," each, as kept
    fits = b"[" + b",".join([b"1e300"] * count) + b"]"  # 1 + 302 * count bytes kept
    over = b"[" + b",".join([b"1e300"] * (count + 1)) + b"]"
    json_type = {"content-type": "application/json"}
    assert (await client.post(path, content=fits, headers=json_type)).status_code in (200, 202)
    r = await client.post(path, content=over, headers=json_type)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "payload_too_large"
    assert "1e300 takes 301 bytes" in r.json()["error"]["message"]
    assert len(outbox.rows) == 1
    as_text = await client.post(path, content=over, headers={"content-type": "text/plain"})
    assert as_text.status_code in (200, 202)
    assert len(outbox.rows) == 2


async def test_request_headers_are_bounded_in_number_and_size(env) -> None:  # type: ignore[no-untyped-def]
    """Headers are stored with the execution: at most MAX_REQUEST_HEADERS of
    MAX_REQUEST_HEADER_BYTES in all, exactly at either edge accepted, one past it 431,
    before anything is looked up or written."""
    client, outbox, _, _ = env
    base = client.build_request("POST", "/apps/shop/orders/1", content=b"x")
    used = sum(len(k) + len(v) for k, v in base.headers.raw)
    count = len(base.headers.raw)

    async def send(extra: list[tuple[str, str]]) -> int:
        request = client.build_request("POST", "/apps/shop/orders/1", content=b"x")
        for name, value in extra:
            request.headers[name] = value
        return (await client.send(request)).status_code

    pad = [("x-pad", "a" * (MAX_REQUEST_HEADER_BYTES - used - len("x-pad")))]
    assert await send(pad) == 200
    assert await send([("x-pad", pad[0][1] + "a")]) == 431
    many = [(f"x-{i}", "1") for i in range(MAX_REQUEST_HEADERS - count)]
    assert await send(many) == 200
    assert await send([*many, ("x-last", "1")]) == 431
    assert len(outbox.rows) == 2
    too_many = await client.post("/apps/nope/x", headers={f"x-{i}": "1" for i in range(200)})
    assert too_many.status_code == 431
    assert too_many.json()["error"]["code"] == "headers_too_large"


async def test_unknown_app_and_route_are_404_other_method_405(env) -> None:  # type: ignore[no-untyped-def]
    """404 for an unknown app or path, 405 with Allow for a known path."""
    client, _, _, _ = env
    assert (await client.get("/apps/nope/hello")).status_code == 404
    assert (await client.get("/apps/shop/nothing")).status_code == 404
    r = await client.delete("/apps/shop/hello")
    assert r.status_code == 405
    assert r.headers["allow"] == "GET, HEAD"
    assert r.json()["error"]["message"] == "DELETE is not allowed here (only GET, HEAD)"


async def test_async_route_answers_202_with_location(env) -> None:  # type: ignore[no-untyped-def]
    """An async route writes a row with no reply_to and answers 202 at once."""
    client, outbox, _, _ = env
    r = await client.post("/apps/shop/jobs", content=b"x")
    assert r.status_code == 202
    body = r.json()
    assert set(body) == {"accepted_at", "execution_id"}
    (row,) = outbox.rows
    assert row.reply_to is None
    assert str(row.execution_id) == body["execution_id"]
    assert r.headers["location"] == f"/api/v1/admin/apps/{APP}/executions/{body['execution_id']}"


@pytest.mark.parametrize(
    ("kind", "status"),
    [
        (InboxFailureKind.REJECTED, 422),
        (InboxFailureKind.SCRIPT_ERROR, 502),
        (InboxFailureKind.OVERLOADED, 503),
        (InboxFailureKind.TIMEOUT, 504),
        (InboxFailureKind.RESOURCE_EXHAUSTED, 507),
        (InboxFailureKind.INTERNAL, 500),
    ],
)
async def test_failures_map_to_the_status_table(env, kind: InboxFailureKind, status: int) -> None:  # type: ignore[no-untyped-def]
    """Each InboxFailureKind becomes its status and the documented error body; an
    internal failure's message stays in the execution record (DESIGN: a 500's body
    never leaks internals: "the worker exited with signal 6", whose rights lapsed)."""
    client, outbox, _, _ = env
    outbox.answer = lambda row: InboxResult.failed(row.execution_id, kind, "boom")
    r = await client.get("/apps/shop/hello")
    assert r.status_code == status
    assert r.json() == {
        "error": {
            "code": kind.value,
            "message": "internal error" if kind is InboxFailureKind.INTERNAL else "boom",
            "execution_id": str(outbox.rows[0].execution_id),
        }
    }


async def test_saturated_gate_is_503_with_retry_after(env) -> None:  # type: ignore[no-untyped-def]
    """With no free slot, a sync request is refused before anything is written."""
    client, outbox, _, gate = env
    permits = [gate.try_acquire() for _ in range(gate.capacity)]
    r = await client.get("/apps/shop/hello")
    assert r.status_code == 503
    assert r.headers["retry-after"] == "1"
    assert outbox.rows == []
    for p in permits:
        assert p is not None
        p.release()


async def test_a_slot_freed_within_the_admission_wait_admits_the_request(env) -> None:  # type: ignore[no-untyped-def]
    """A full gate that frees a slot within admission_wait_seconds: served, not 503.
    The freed slot goes to the waiting request, before anyone who only tries."""
    client, outbox, _, gate = env
    permits = [gate.try_acquire() for _ in range(gate.capacity)]
    stolen: list[Permit | None] = []

    async def free_one_soon() -> None:
        await anyio.sleep(0.05)
        permits[0].release()
        stolen.append(gate.try_acquire())  # a claim loop racing for the slot

    async with anyio.create_task_group() as tg:
        tg.start_soon(free_one_soon)
        r = await client.get("/apps/shop/hello")
    assert r.status_code == 200
    assert len(outbox.rows) == 1
    assert stolen == [None]
    for p in permits:
        assert p is not None
        p.release()


async def test_a_sync_request_hands_its_slot_to_the_outbox_with_its_row(env) -> None:  # type: ignore[no-untyped-def]
    """Admitted means holding a slot: the row is written with it (the dispatcher runs
    it on that slot), so nothing can take the slot between admission and the run.
    Async rows carry none."""
    client, outbox, _, gate = env
    outbox.delay = 0.2
    async with anyio.create_task_group() as tg:
        tg.start_soon(client.get, "/apps/shop/hello")
        with anyio.fail_after(5):
            while not outbox.permits:  # noqa: ASYNC110 - waiting for the enqueue
                await anyio.sleep(0.005)
        assert gate.free == gate.capacity - 1  # held while the script "runs"
    assert gate.free == gate.capacity
    (held,) = outbox.permits
    assert held is not None
    await client.post("/apps/shop/jobs")
    assert outbox.permits[1] is None


async def test_no_answer_in_time_is_504_and_the_late_answer_is_abandoned(env) -> None:  # type: ignore[no-untyped-def]
    """The wait is timeout_seconds + buffer; afterwards the receiver is gone."""
    client, outbox, routes, _ = env
    outbox.answer = lambda row: None
    orch_timeout = routes.targets[0].timeout_seconds
    with anyio.fail_after(orch_timeout + 10):
        r = await client.get("/apps/shop/hello")
    assert r.status_code == 504
    row = outbox.rows[0]
    assert row.reply_to is not None
    status = await outbox.inbox.deliver(
        row.reply_to, InboxResult(row.execution_id, response=ScriptResponse.empty())
    )
    assert status.value == "abandoned"


async def test_a_node_that_stops_answers_its_waiting_sync_callers_503(env) -> None:  # type: ignore[no-untyped-def]
    """InboxRegistry.stop_waiting (the node stops) ends a sync wait at once with 503
    ``unavailable`` and its execution id; the late answer is abandoned, so the
    execution cannot commit."""
    client, outbox, _, _ = env
    outbox.answer = lambda row: None
    answers: list[httpx.Response] = []
    async with anyio.create_task_group() as tg:

        async def call() -> None:
            answers.append(await client.get("/apps/shop/hello"))

        tg.start_soon(call)
        with anyio.fail_after(5):
            while not outbox.rows:  # noqa: ASYNC110 - the fake outbox has no event
                await anyio.sleep(0.01)
            assert outbox.inbox.stop_waiting() == 1
    (r,) = answers
    assert r.status_code == 503
    assert r.headers["retry-after"] == "1"
    row = outbox.rows[0]
    assert r.json()["error"] == {
        "code": "unavailable",
        "message": "this node is stopping; nothing of the request was kept; retry",
        "execution_id": str(row.execution_id),
    }
    assert row.reply_to is not None
    status = await outbox.inbox.deliver(
        row.reply_to, InboxResult(row.execution_id, response=ScriptResponse.empty())
    )
    assert status.value == "abandoned"


async def test_an_answer_after_the_disconnect_watch_started_is_served(env) -> None:  # type: ignore[no-untyped-def]
    """The wait goes on past the point where the client starts being watched."""
    client, outbox, _, _ = env
    outbox.delay = DISCONNECT_WATCH_AFTER * 3
    r = await client.get("/apps/shop/hello")
    assert r.status_code == 200
    assert outbox.delivery_statuses == ["delivered"]


async def test_a_client_gone_before_the_watch_starts_is_still_noticed() -> None:
    """A disconnect that came before the watcher started is seen when it starts: the
    receiver is dropped, so the (later) answer is abandoned."""
    inbox = InboxRegistry()
    messages = [{"type": "http.request", "body": b"", "more_body": False}]
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/apps/shop/hello",
        "raw_path": b"/apps/shop/hello",
        "root_path": "",
        "query_string": b"",
        "headers": [],
        "server": ("test", 80),
    }
    async with anyio.create_task_group() as tg:
        outbox = FakeOutbox(inbox, tg)
        outbox.delay = 1.0
        orch = UserRouteOrchestrator(
            FakeRoutes([target("GET", "/hello", timeout=30)]),
            outbox,
            inbox,
            ExecutionGate(4),
            node_id="n1",
        )
        with anyio.fail_after(outbox.delay):  # long before the 30 s wait would end
            await Starlette(routes=orch.routes())(scope, receive, send)  # type: ignore[arg-type]
        assert len(inbox) == 0
        assert sent == []  # no 504 for a caller who is gone (the access log shows "-")
    assert outbox.delivery_statuses == ["abandoned"]


async def test_script_headers_and_status_pass_through(env) -> None:  # type: ignore[no-untyped-def]
    """ctx.response(status, headers) reaches the client; content-length is the server's."""
    client, outbox, _, _ = env
    outbox.answer = lambda row: InboxResult(
        row.execution_id,
        response=ScriptResponse(201, (("X-Thing", "1"), ("content-length", "999")), b"made"),
    )
    r = await client.get("/apps/shop/hello")
    assert r.status_code == 201
    assert r.headers["x-thing"] == "1"
    assert r.content == b"made"


UNSTORABLE_JSON = {
    "NaN": b'{"a": NaN}',
    "overflowing number": b"1e400",
    "NUL escape": b'{"note": "a\\u0000b"}',
    "half a surrogate pair": b'"\\ud800"',
    "nesting past the parser": b"[" * 100_000,
}


@pytest.mark.parametrize("path", ["/apps/shop/orders/1", "/apps/shop/jobs"], ids=["sync", "async"])
@pytest.mark.parametrize("raw", UNSTORABLE_JSON.values(), ids=UNSTORABLE_JSON.keys())
async def test_json_that_cannot_be_stored_is_422_without_running_anything(  # type: ignore[no-untyped-def]
    env, path: str, raw: bytes
) -> None:
    """Python's parser takes these, JSON and PostgreSQL's jsonb do not: refused up
    front, so no row fails to write (and no batch of other requests with it)."""
    client, outbox, _, _ = env
    r = await client.post(path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "rejected"
    assert outbox.rows == []


async def test_nul_in_request_text_reaches_the_event_as_a_replacement_character(env) -> None:  # type: ignore[no-untyped-def]
    """A %00 in the path or query, or a NUL byte in a text body, is valid HTTP but no
    PostgreSQL string holds it: it becomes U+FFFD, as undecodable bytes do."""
    client, outbox, _, _ = env
    r = await client.post(
        "/apps/shop/orders/a%00b?q=%00", content=b"x\x00y", headers={"content-type": "text/plain"}
    )
    assert r.status_code == 200
    (row,) = outbox.rows
    event = HttpDispatchPayload.from_wire(row.payload).event
    assert event["params"] == {"order_id": "a\ufffdb"}
    assert event["path"] == "/orders/a\ufffdb"
    assert event["query"] == {"q": "\ufffd"}
    assert event["body"] == "x\ufffdy"
    assert "\\u0000" not in wire.dumps(row.payload)


async def test_an_app_name_no_app_can_have_is_404_without_a_lookup(env) -> None:  # type: ignore[no-untyped-def]
    client, outbox, routes, _ = env
    looked_up: list[str] = []
    original = routes.routes_for_app

    async def counting(app_name: str) -> Sequence[RouteTarget] | None:
        looked_up.append(app_name)
        return await original(app_name)

    routes.routes_for_app = counting
    for name in ("sh%00op", "Shop", "s" * 64, "sh%C3%B6p"):
        r = await client.get(f"/apps/{name}/hello")
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "not_found"
    assert looked_up == []
    assert (await client.get("/apps/shop/hello")).status_code == 200
    assert looked_up == ["shop"]
    assert len(outbox.rows) == 1


@pytest.mark.parametrize("method", ["TRACE", "PROPFIND", "CONNECT"])
async def test_any_other_method_gets_the_json_404_and_405(env, method: str) -> None:  # type: ignore[no-untyped-def]
    """Methods no route can have still get picloud's answers: 404 for an unknown app
    or path, 405 with ``Allow`` for a known path."""
    client, outbox, _, _ = env
    r = await client.request(method, "/apps/shop/hello")
    assert r.status_code == 405
    assert r.headers["allow"] == "GET, HEAD"
    assert r.json()["error"]["code"] == "method_not_allowed"
    for path in ("/apps/nope/hello", "/apps/shop/nowhere"):
        r = await client.request(method, path)
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "not_found"
    assert outbox.rows == []


@pytest.mark.parametrize("status", [204, 205, 304])
async def test_a_status_without_content_is_answered_without_the_body(  # type: ignore[no-untyped-def]
    env, status: int
) -> None:
    client, outbox, _, _ = env
    outbox.answer = lambda row: InboxResult(
        row.execution_id, response=ScriptResponse(status, (("x-k", "v"),), b"body")
    )
    r = await client.get("/apps/shop/hello")
    assert (r.status_code, r.content, r.headers["x-k"]) == (status, b"", "v")


async def test_hop_by_hop_headers_of_a_script_are_dropped(env) -> None:  # type: ignore[no-untyped-def]
    client, outbox, _, _ = env
    hop = ("connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade")
    outbox.answer = lambda row: InboxResult(
        row.execution_id,
        response=ScriptResponse(200, (*((h, "x") for h in hop), ("x-k", "v")), b"ok"),
    )
    r = await client.get("/apps/shop/hello")
    assert (r.status_code, r.content, r.headers["x-k"]) == (200, b"ok", "v")
    assert not set(hop) & set(r.headers)


@pytest.mark.parametrize("path", ["/apps/shop/hello", "/apps/shop/jobs"], ids=["sync", "async"])
async def test_an_outbox_that_fails_is_the_json_500_and_frees_the_slot(  # type: ignore[no-untyped-def]
    env, path: str
) -> None:
    client, outbox, _, gate = env

    async def broken(row: NewOutboxRow, *, permit: Permit | None = None) -> None:
        if permit is not None:
            permit.release()  # the writer owns the slot it was handed
        raise RuntimeError("database on fire")

    outbox.enqueue = broken
    r = await client.request("GET" if path.endswith("hello") else "POST", path)
    assert r.status_code == 500
    assert r.json() == {
        "error": {"code": "internal", "message": "internal error", "execution_id": None}
    }
    assert gate.free == gate.capacity


@pytest.mark.parametrize("where", ["route table", "outbox"])
@pytest.mark.parametrize("path", ["/apps/shop/hello", "/apps/shop/jobs"], ids=["sync", "async"])
async def test_a_database_out_of_reach_is_503_unavailable(  # type: ignore[no-untyped-def]
    env, where: str, path: str
) -> None:
    """Nothing was written: 503 with Retry-After, and the request's slot is free."""
    client, outbox, routes, gate = env

    async def gone(*args: object, permit: Permit | None = None) -> None:
        if permit is not None:
            permit.release()
        raise Unavailable("the database is unavailable")

    if where == "outbox":
        outbox.enqueue = gone
    else:
        routes.routes_for_app = gone
    r = await client.request("GET" if path.endswith("hello") else "POST", path)
    assert r.status_code == 503
    assert r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "unavailable"
    assert gate.free == gate.capacity


def _served(outbox: FakeOutbox) -> tuple[RouteId, HttpEvent]:
    """The route and the event of the one row written."""
    (row,) = outbox.rows
    assert row.route_id is not None
    return row.route_id, HttpEvent.from_wire(HttpDispatchPayload.from_wire(row.payload).event)


# (param route, literal route, a request path both match, one only the param route
# matches): most literals here sort after "{" (a database's ORDER BY path gives them
# after the param route).
SPECIFIC = {
    "é": ("/u/{id}", "/u/é", "/u/%C3%A9", "/u/e"),
    "tilde": ("/u/{id}", "/u/~x", "/u/~x", "/u/x"),
    "bar": ("/u/{id}", "/u/|x", "/u/%7Cx", "/u/x"),
    "ascii": ("/u/{id}", "/u/me", "/u/me", "/u/you"),
    "later segment": ("/a/{x}/z", "/a/é/{y}", "/a/%C3%A9/z", "/a/e/z"),
    "deeper": ("/a/{x}/{y}", "/a/{x}/ü", "/a/1/%C3%BC", "/a/1/u"),
}


@pytest.mark.parametrize("literal_first", [False, True], ids=["param-first", "literal-first"])
@pytest.mark.parametrize(
    ("param", "literal", "path", "other"), SPECIFIC.values(), ids=SPECIFIC.keys()
)
async def test_a_literal_segment_wins_over_a_param_in_any_order(  # type: ignore[no-untyped-def]
    env, param: str, literal: str, path: str, other: str, literal_first: bool
) -> None:
    """At the first segment where two matching routes differ, the literal one is
    served, whatever order the route table gives them in; the param route still
    serves every other request."""
    client, outbox, routes, _ = env
    p, lit = target("GET", param), target("GET", literal)
    routes.targets = [lit, p] if literal_first else [p, lit]
    r = await client.get("/apps/shop" + path)
    assert r.status_code == 200
    assert _served(outbox)[0] == lit.route_id
    outbox.rows.clear()
    r = await client.get("/apps/shop" + other)
    assert r.status_code == 200
    assert _served(outbox)[0] == p.route_id


async def test_a_param_holding_a_line_break_reaches_its_route(env) -> None:  # type: ignore[no-untyped-def]
    """``%0A`` in a path param decodes to a newline, which the route still matches."""
    client, outbox, routes, _ = env
    routes.targets = [target("GET", "/u/{id}")]
    r = await client.get("/apps/shop/u/a%0Ab")
    assert r.status_code == 200, r.text
    assert _served(outbox)[1].params == {"id": "a\nb"}


async def test_the_most_specific_of_several_routes_is_served(env) -> None:  # type: ignore[no-untyped-def]
    """Compared segment by segment: ``/a/b/{y}`` beats ``/a/{x}/c`` (its literal
    comes first), which beats ``/a/{x}/{y}``."""
    client, outbox, routes, _ = env
    both, first, second = (
        target("GET", "/a/{x}/{y}"),
        target("GET", "/a/b/{y}"),
        target("GET", "/a/{x}/c"),
    )
    routes.targets = [both, second, first]
    for path, served in (("/a/b/c", first), ("/a/z/c", second), ("/a/z/z", both)):
        outbox.rows.clear()
        assert (await client.get("/apps/shop" + path)).status_code == 200
        assert _served(outbox)[0] == served.route_id, path


async def test_a_head_route_is_served_beside_a_get_route(env) -> None:  # type: ignore[no-untyped-def]
    """An exact method match wins: HEAD reaches the HEAD route, also when a GET route
    of the path comes first or is more specific."""
    client, outbox, routes, _ = env
    get, head = target("GET", "/h/{id}"), target("HEAD", "/h/{id}")
    get_me = target("GET", "/h/me")
    routes.targets = [get_me, get, head]
    for path in ("/h/1", "/h/me"):
        outbox.rows.clear()
        r = await client.head("/apps/shop" + path)
        assert r.status_code == 200
        route_id, event = _served(outbox)
        assert (route_id, event.method) == (head.route_id, "HEAD")
    outbox.rows.clear()
    assert (await client.get("/apps/shop/h/1")).status_code == 200
    assert _served(outbox)[0] == get.route_id


async def test_head_falls_back_to_the_get_route_and_405_allows_it(env) -> None:  # type: ignore[no-untyped-def]
    """Without a HEAD route, HEAD runs the path's GET route (the most specific one),
    its event's method ``HEAD``; a path served by GET lists HEAD in its ``Allow``."""
    client, outbox, routes, _ = env
    get, get_me, post = target("GET", "/g/{id}"), target("GET", "/g/me"), target("POST", "/p")
    routes.targets = [get, get_me, post]
    r = await client.head("/apps/shop/g/me")
    assert r.status_code == 200
    route_id, event = _served(outbox)
    assert (route_id, event.method) == (get_me.route_id, "HEAD")
    r = await client.delete("/apps/shop/g/1")
    assert (r.status_code, r.headers["allow"]) == (405, "GET, HEAD")
    r = await client.head("/apps/shop/p")  # no GET there: HEAD is not allowed
    assert (r.status_code, r.headers["allow"]) == (405, "POST")


async def test_a_date_header_of_a_script_is_dropped(env) -> None:  # type: ignore[no-untyped-def]
    """The server sends its own Date: a script's would be a second one."""
    client, outbox, _, _ = env
    outbox.answer = lambda row: InboxResult(
        row.execution_id,
        response=ScriptResponse(
            200, (("Date", "Tue, 01 Jan 1980 00:00:00 GMT"), ("x-k", "v")), b"ok"
        ),
    )
    r = await client.get("/apps/shop/hello")
    assert (r.status_code, r.content, r.headers["x-k"]) == (200, b"ok", "v")
    assert "date" not in r.headers


@pytest.mark.parametrize(
    "content_type",
    ["application/ld+json", "application/problem+json; charset=utf-8", "application/jsonx"],
)
async def test_only_application_json_is_parsed(env, content_type: str) -> None:  # type: ignore[no-untyped-def]
    """API.md: ``json`` is the parsed body for ``application/json`` only; another
    type (``+json`` ones too) reaches the script as text, even when not JSON."""
    client, outbox, _, _ = env
    for raw in (b'{"a": 1}', b"{nope"):
        outbox.rows.clear()
        r = await client.post(
            "/apps/shop/orders/1", content=raw, headers={"content-type": content_type}
        )
        assert r.status_code == 200
        event = _served(outbox)[1]
        assert (event.body, event.json) == (raw.decode(), None)


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "Application/JSON; charset=utf-8", " application/json ;x=y"],
)
async def test_application_json_is_parsed_in_any_case_with_parameters(  # type: ignore[no-untyped-def]
    env, content_type: str
) -> None:
    client, outbox, _, _ = env
    r = await client.post(
        "/apps/shop/orders/1", content=b'{"a": 1}', headers={"content-type": content_type}
    )
    assert r.status_code == 200
    assert _served(outbox)[1].json == {"a": 1}
