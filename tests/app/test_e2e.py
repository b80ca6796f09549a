"""End to end: the real ``picloud serve`` binary over HTTP, on a real database.

One server per module (starting one costs a few seconds); every test works in its
own app so they do not see each other's data.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from picloud_shared.limits import MAX_BODY_BYTES_IN_FLIGHT, MAX_REQUEST_BODY_BYTES
from tests.app.server import Server, serving
from tests.pg import PgServer


class Admin:
    """A thin client of the admin API for one app."""

    def __init__(self, server: Server) -> None:
        self.http = server.client(headers=server.auth)
        self.app_name = f"e2e-{uuid.uuid4().hex[:8]}"
        r = self.http.post("/api/v1/admin/apps", json={"name": self.app_name})
        assert r.status_code == 201, r.text
        self.app_id = r.json()["id"]
        self.base = f"/api/v1/admin/apps/{self.app_id}"

    def post(self, path: str, body: Any, expect: int = 201) -> Any:
        r = self.http.post(self.base + path, json=body)
        assert r.status_code == expect, r.text
        return r.json()

    def get(self, path: str, **params: Any) -> Any:
        r = self.http.get(self.base + path, params=params)
        assert r.status_code == 200, r.text
        return r.json()

    def script(self, name: str, source: str, **extra: Any) -> None:
        self.post("/scripts", {"name": name, "source": source, **extra})

    def route(self, method: str, path: str, script: str, mode: str = "sync") -> None:
        self.post(
            "/routes", {"method": method, "path": path, "script": script, "dispatch_mode": mode}
        )

    def executions(self, **params: Any) -> list[dict[str, Any]]:
        return list(self.get("/executions", **params)["items"])

    def wait(self, check: Any, timeout: float = 30) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            assert time.monotonic() < deadline, "condition not met in time"
            time.sleep(0.05)


@pytest.fixture
def admin(server: Server) -> Iterator[Admin]:
    a = Admin(server)
    yield a
    a.http.close()


def test_health_readiness_and_metrics(server: Server, user: httpx.Client) -> None:
    """/healthz, /readyz and /metrics answer without a token."""
    assert user.get("/healthz").status_code == 200
    assert user.get("/readyz").json() == {"status": "ready"}
    metrics = user.get("/metrics")
    assert metrics.status_code == 200
    assert "picloud_outbox_depth" in metrics.text
    assert "picloud_executions" in metrics.text
    assert _counter(metrics.text, "picloud_executions_pruned_total") == 0  # retention on
    assert _counter(metrics.text, "picloud_dead_letters_pruned_total") == 0


def test_paths_no_route_has_answer_the_error_shape(user: httpx.Client) -> None:
    """A path outside every route is 404, a method a fixed route does not take 405,
    both as JSON errors (starlette's own answers are plain text)."""
    for path in ("/", "/hello/greet/world", "/api/v2", "/app/x"):
        r = user.get(path)
        assert r.status_code == 404, (path, r.text)
        assert r.json()["error"]["code"] == "not_found", path
        assert "/apps/{app_name}/" in r.json()["error"]["message"]
    r = user.post("/healthz")
    assert r.status_code == 405, r.text
    assert r.json()["error"] == {
        "code": "method_not_allowed",
        "message": f"POST is not allowed here (only {r.headers['allow']})",
    }
    assert "GET" in r.headers["allow"]


def _counter(text: str, name: str) -> float:
    (line,) = [x for x in text.splitlines() if x.startswith(name + " ")]
    return float(line.split()[1])


def test_metrics_count_the_outbox_batches(admin: Admin, user: httpx.Client) -> None:
    """The batching counters move with a sync request: one group-committed write that
    carried its row, handed to this node's dispatcher, one no-write completion."""
    admin.script("quiet", "def handle(e, ctx):\n    return None\n")
    admin.route("GET", "/quiet", "quiet")
    names = (
        "picloud_outbox_write_batches_total",
        "picloud_outbox_written_rows_total",
        "picloud_outbox_handed_off_rows_total",
        "picloud_completion_batches_total",
        "picloud_completed_rows_total",
    )
    before = user.get("/metrics").text
    assert user.get(f"/apps/{admin.app_name}/quiet").status_code == 204
    after = user.get("/metrics").text
    for name in names:
        assert _counter(after, name) >= _counter(before, name) + 1, name
    assert _counter(after, "picloud_outbox_written_rows_total") >= _counter(
        after, "picloud_outbox_write_batches_total"
    )


def test_sync_route_with_path_params_query_and_json(admin: Admin, user: httpx.Client) -> None:
    """A sync route answers with the script's return value, built from the event."""
    admin.script(
        "echo",
        "def handle(event, ctx):\n"
        "    return {'who': event['params']['who'], 'q': event['query'], 'json': event['json'],\n"
        "            'app': ctx.app, 'method': event['method']}\n",
    )
    admin.route("POST", "/hi/{who}", "echo")
    r = user.post(f"/apps/{admin.app_name}/hi/ann?x=1", json={"a": [1]})
    assert r.status_code == 200
    assert r.json() == {
        "who": "ann",
        "q": {"x": "1"},
        "json": {"a": [1]},
        "app": admin.app_name,
        "method": "POST",
    }


def test_an_escaped_slash_belongs_to_its_path_param(admin: Admin, user: httpx.Client) -> None:
    """Segments are decoded one by one after matching: ``%2F`` is part of a param's
    value, not a separator; an unescaped ``/`` still is one."""
    admin.script("param", "def handle(e, ctx):\n    return [e['params'], e['path']]\n")
    admin.route("GET", "/r/{id}", "param")
    r = user.get(f"/apps/{admin.app_name}/r/a%2Fb")
    assert r.json() == [{"id": "a/b"}, "/r/a/b"], r.text
    assert user.get(f"/apps/{admin.app_name}/r/caf%C3%A9").json()[0] == {"id": "café"}
    assert user.get(f"/apps/{admin.app_name}/r/a/b").status_code == 404


def test_repeated_request_headers_are_joined(admin: Admin, user: httpx.Client) -> None:
    """A header sent twice reaches the script once, its values joined with ", " (the
    cookie header with "; "); a repeated query parameter keeps its last value."""
    admin.script(
        "hdrs",
        "def handle(e, ctx):\n"
        "    h = e['headers']\n"
        "    return {'multi': h['x-multi'], 'cookie': h['cookie'], 'q': e['query']['a']}\n",
    )
    admin.route("GET", "/h", "hdrs")
    r = user.get(
        f"/apps/{admin.app_name}/h?a=1&a=2",
        headers=[("x-multi", "a"), ("x-multi", "b, c"), ("cookie", "k=1"), ("cookie", "j=2")],
    )
    assert r.json() == {"multi": "a, b, c", "cookie": "k=1; j=2", "q": "2"}, r.text


def test_return_forms(admin: Admin, user: httpx.Client) -> None:
    """str → text/plain, None → 204, ctx.response → as built."""
    admin.script("text", "def handle(e, ctx):\n    return 'plain'\n")
    admin.script("none", "def handle(e, ctx):\n    return None\n")
    admin.script(
        "custom", "def handle(e, ctx):\n    return ctx.response('made', 201, {'x-a': 'b'})\n"
    )
    for name in ("text", "none", "custom"):
        admin.route("GET", f"/{name}", name)
    r = user.get(f"/apps/{admin.app_name}/text")
    assert (r.status_code, r.text, r.headers["content-type"].split(";")[0]) == (
        200,
        "plain",
        "text/plain",
    )
    assert user.get(f"/apps/{admin.app_name}/none").status_code == 204
    r = user.get(f"/apps/{admin.app_name}/custom")
    assert (r.status_code, r.text, r.headers["x-a"]) == (201, "made", "b")


def test_responses_without_content_and_hop_headers_keep_the_connection(
    admin: Admin, user: httpx.Client
) -> None:
    """A 204/205/304 the script gave a body, or a hop-by-hop header it set, would make
    the HTTP server break the connection: the body and the header are dropped, and
    the same keep-alive connection serves the next request. A response without
    content carries no content-type, and a script's Server header is the only one."""
    admin.script(
        "bodied",
        "def handle(e, ctx):\n"
        "    s = int(e['query']['s'])\n"
        "    hop = {'upgrade': 'websocket', 'keep-alive': 'a', 'x-k': 'v', 'server': 'mine'}\n"
        "    return ctx.response('x', s, hop)\n",
    )
    admin.route("GET", "/b", "bodied")
    for status in (204, 205, 304, 200):
        r = user.get(f"/apps/{admin.app_name}/b", params={"s": status})
        assert r.status_code == status
        assert r.content == (b"x" if status == 200 else b"")
        assert r.headers["x-k"] == "v"
        assert "upgrade" not in r.headers
        assert "keep-alive" not in r.headers
        assert ("content-type" in r.headers) == (status == 200)
        assert r.headers.get_list("server") == ["mine"]
    assert "server" not in user.get("/healthz").headers
    assert user.get("/healthz").status_code == 200


@pytest.mark.parametrize(
    ("source", "extra", "status", "code"),
    [
        ("def handle(e, ctx):\n    ctx.reject('nope')\n", {}, 422, "rejected"),
        ("def handle(e, ctx):\n    raise ValueError('boom')\n", {}, 502, "script_error"),
        ("def handle(e, ctx)\n    pass\n", {}, 502, "script_error"),
        (
            "import time\ndef handle(e, ctx):\n    time.sleep(30)\n",
            {"timeout_seconds": 1},
            504,
            "timeout",
        ),
        (
            "def handle(e, ctx):\n    x = bytearray(200 * 1024 * 1024)\n    return len(x)\n",
            {"memory_limit_mb": 16},
            507,
            "resource_exhausted",
        ),
    ],
    ids=["reject", "raise", "syntax", "timeout", "memory"],
)
def test_failure_table(
    admin: Admin, user: httpx.Client, source: str, extra: dict[str, Any], status: int, code: str
) -> None:
    """Each failure kind answers its status with the documented error body."""
    admin.script("s", source, **extra)
    admin.route("GET", "/f", "s")
    r = user.get(f"/apps/{admin.app_name}/f")
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code
    assert set(error) == {"code", "message", "execution_id"}
    if code == "rejected":  # the script's answer to its caller
        assert error["message"] == "nope"
    if code == "script_error":  # how it failed, never the text of the script's error
        assert "boom" not in error["message"]
        assert error["message"].startswith("the script ")
    execution = admin.get(f"/executions/{error['execution_id']}")
    assert execution["status"] == "failed"


def test_unparsable_json_body_is_422_without_an_execution(admin: Admin, user: httpx.Client) -> None:
    """A body that claims JSON but is not never reaches the script."""
    admin.script("s", "def handle(e, ctx):\n    return 1\n")
    admin.route("POST", "/j", "s")
    r = user.post(
        f"/apps/{admin.app_name}/j", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert r.status_code == 422
    assert admin.executions() == []


def test_saturated_gate_answers_503(server: Server, admin: Admin) -> None:
    """With every gate slot busy (the module's 4: 3 for one app, its share, and 1 for
    another), a sync request is refused with Retry-After."""
    slow = "import time\ndef handle(e, ctx):\n    time.sleep(3)\n"
    other = Admin(server)
    for a in (admin, other):
        a.script("slow", slow)
        a.route("GET", "/slow", "slow")
    admin.script("fast", "def handle(e, ctx):\n    return 1\n")
    admin.route("GET", "/fast", "fast")
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        slow_calls = [
            pool.submit(httpx.get, f"{server.base_url}/apps/{a.app_name}/slow", timeout=30)
            for a in (admin, admin, admin, other)
        ]
        time.sleep(1.0)
        r = httpx.get(f"{server.base_url}/apps/{admin.app_name}/fast", timeout=30)
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"]
        assert r.json()["error"]["code"] == "overloaded"
        assert [f.result().status_code for f in slow_calls] == [204] * 4
    other.http.close()


def test_one_apps_flood_of_sync_requests_leaves_slots_to_other_apps(
    server: Server, admin: Admin
) -> None:
    """One app's sync requests hold at most its share of the gate (3 of the module's
    4 slots): past it they are refused 503 after the admission wait, while another
    app's request is served at once."""
    admin.script("slow", "import time\ndef handle(e, ctx):\n    time.sleep(4)\n")
    admin.route("GET", "/slow", "slow")
    other = Admin(server)
    other.script("fast", "def handle(e, ctx):\n    return 'other'\n")
    other.route("GET", "/fast", "fast")
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        flood = [
            pool.submit(httpx.get, f"{server.base_url}/apps/{admin.app_name}/slow", timeout=30)
            for _ in range(6)
        ]
        time.sleep(1.5)  # past the admission wait (1 s): the three past the share refused
        r = httpx.get(f"{server.base_url}/apps/{other.app_name}/fast", timeout=30)
        assert (r.status_code, r.text) == (200, "other")
        statuses = sorted(f.result().status_code for f in flood)
    assert statuses == [204, 204, 204, 503, 503, 503], statuses
    other.http.close()


def test_a_sync_request_is_not_queued_behind_an_async_backlog(
    admin: Admin, user: httpx.Client
) -> None:
    """While queued async executions keep every gate slot busy, a sync request takes
    the next slot that frees (it holds it from admission to its run) instead of
    waiting behind the whole backlog in the outbox."""
    admin.script("slow", "import time\ndef handle(e, ctx):\n    time.sleep(0.2)\n")
    admin.script("fast", "def handle(e, ctx):\n    return 'fast'\n")
    admin.route("POST", "/backlog", "slow", "async")
    admin.route("GET", "/fast", "fast")
    backlog = 40  # 40 x 0.2 s on the module's 4 slots: about 2 s of queued work
    for _ in range(backlog):
        assert user.post(f"/apps/{admin.app_name}/backlog").status_code == 202
    admin.wait(lambda: admin.executions(status="running"))
    # Counted from here: on a loaded machine many may run while the backlog is posted.
    before = len(admin.executions(status="succeeded", source_kind="http"))
    r = user.get(f"/apps/{admin.app_name}/fast", timeout=30)
    assert (r.status_code, r.text) == (200, "fast")
    waited = len(admin.executions(status="succeeded", source_kind="http")) - before
    left = backlog - before
    # Taking the next free slot, it waits for about one run per slot (4), not for
    # the backlog left (up to 40).
    assert waited < max(left // 2, 9), f"the sync request waited for {waited} of {left} queued"


def _raw_post(server: Server, path: str, length: int, *extra: str, sent: int = 0) -> socket.socket:
    """A connection that has sent a POST's headers declaring ``length`` body bytes,
    and ``sent`` bytes of that body."""
    host, port = server.base_url.removeprefix("http://").split(":")
    conn = socket.create_connection((host, int(port)), timeout=10)
    lines = [f"POST {path} HTTP/1.1", "Host: t", f"Content-Length: {length}", *extra]
    conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + b"a" * sent)
    return conn


def test_a_sync_request_the_gate_refuses_is_answered_before_its_body(
    server: Server, admin: Admin
) -> None:
    """With every gate slot busy, a sync request is refused before its body is read:
    a client that asked ``Expect: 100-continue`` gets the 503 instead of the go-ahead
    to send its 1 MiB, and the connection is closed rather than drained."""
    other = Admin(server)  # the module's 4 slots: 3 (an app's share) and 1 of another app
    for a in (admin, other):
        a.script("slow", "import time\ndef handle(e, ctx):\n    time.sleep(3)\n")
        a.route("GET", "/slow", "slow")
    admin.script("echo", "def handle(e, ctx):\n    return e['json']\n")
    admin.route("POST", "/echo", "echo")
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        slow = [
            pool.submit(httpx.get, f"{server.base_url}/apps/{a.app_name}/slow", timeout=30)
            for a in (admin, admin, admin, other)
        ]
        time.sleep(1.0)
        with _raw_post(
            server,
            f"/apps/{admin.app_name}/echo",
            MAX_REQUEST_BODY_BYTES,
            "Content-Type: application/json",
            "Expect: 100-continue",
        ) as conn:
            answer = b""
            while chunk := conn.recv(65536):  # until the server closes the connection
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 503 "), answer
        assert b"100 Continue" not in answer
        assert b"\r\nconnection: close\r\n" in answer.lower()
        assert b'"code":"overloaded"' in answer.replace(b" ", b"")
        assert [f.result().status_code for f in slow] == [204] * 4
    other.http.close()


def test_request_bodies_in_flight_on_a_node_are_bounded(server: Server, admin: Admin) -> None:
    """A node holds at most MAX_BODY_BYTES_IN_FLIGHT of request bodies at once, counted
    as their bytes arrive: while slow clients have sent all of it but one byte (and
    stalled), a 1-byte body still fits and a 2-byte one is refused with 503
    ``overloaded``; once they are gone, a whole 1 MiB body fits again."""
    admin.script("noop", "def handle(e, ctx):\n    return None\n")
    admin.route("POST", "/in", "noop", "async")
    path = f"/apps/{admin.app_name}/in"
    url = server.base_url + path
    whole = MAX_BODY_BYTES_IN_FLIGHT // MAX_REQUEST_BODY_BYTES
    sent = [MAX_REQUEST_BODY_BYTES - 1] * whole + [whole - 1]  # 1 byte short in all
    assert sum(sent) == MAX_BODY_BYTES_IN_FLIGHT - 1
    holders = []
    try:
        for size in sent:  # the rest of their bodies never comes
            holders.append(_raw_post(server, path, size + 1, sent=size))
        deadline = time.monotonic() + 30
        while (over := httpx.post(url, content=b"ab", timeout=30)).status_code != 503:
            assert over.status_code == 202, over.text  # not every holder is read yet
            assert time.monotonic() < deadline, "the budget never filled"
        assert over.json()["error"]["code"] == "overloaded"
        assert over.headers["retry-after"] == "1"
        assert httpx.post(url, content=b"a", timeout=30).status_code == 202
    finally:
        for conn in holders:
            conn.close()
    deadline = time.monotonic() + 30
    while (
        r := httpx.post(url, content=b"a" * MAX_REQUEST_BODY_BYTES, timeout=30)
    ).status_code != 202:
        assert r.status_code == 503, r.text  # the holders' shares are not back yet
        assert time.monotonic() < deadline, "the holders' shares never came back"


def test_a_deleted_route_stops_serving_at_once_on_its_node(
    admin: Admin, user: httpx.Client
) -> None:
    """The node whose admin API deleted the route forgets its cached copy at once:
    the next request is a 404, not a run of a route that is gone (a 500)."""
    admin.script("s", "def handle(e, ctx):\n    return 'here'\n")
    route = admin.post("/routes", {"method": "GET", "path": "/soon-gone", "script": "s"})
    assert user.get(f"/apps/{admin.app_name}/soon-gone").text == "here"  # now cached
    r = admin.http.delete(f"{admin.base}/routes/{route['id']}")
    assert r.status_code == 204
    r = user.get(f"/apps/{admin.app_name}/soon-gone")
    assert r.status_code == 404, r.text


def test_a_more_specific_route_created_is_served_at_once_on_its_node(
    admin: Admin, user: httpx.Client
) -> None:
    """With ``GET /u/{id}`` cached (it has served a request), a new ``GET /u/me`` is
    served by the next request on the node whose admin API created it, not by the
    cached ``/u/{id}`` until the cache's ttl ends."""
    admin.script("any", "def handle(e, ctx):\n    return 'any ' + e['params']['id']\n")
    admin.script("me", "def handle(e, ctx):\n    return 'me'\n")
    admin.route("GET", "/u/{id}", "any")
    assert user.get(f"/apps/{admin.app_name}/u/me").text == "any me"  # now cached
    admin.route("GET", "/u/me", "me")
    assert user.get(f"/apps/{admin.app_name}/u/me").text == "me"
    assert user.get(f"/apps/{admin.app_name}/u/42").text == "any 42"


def test_a_document_id_holding_slashes_is_addressable(admin: Admin, user: httpx.Client) -> None:
    """A document a script inserted under the id ``a/b`` is read through the admin API
    at ``…/docs/c/a/b`` and at ``…/docs/c/a%2Fb`` (the server decodes the path), and
    deleted there."""
    admin.script(
        "ins", "def handle(e, ctx):\n    return ctx.docs.insert('c', {'v': 1}, id='a/b')\n"
    )
    admin.route("POST", "/ins", "ins")
    assert user.post(f"/apps/{admin.app_name}/ins").text == "a/b"
    assert admin.get("/docs/c/a/b") == {"id": "a/b", "data": {"v": 1}}
    assert admin.get("/docs/c/a%2Fb") == {"id": "a/b", "data": {"v": 1}}
    assert admin.http.delete(f"{admin.base}/docs/c/a%2Fb").status_code == 204
    assert admin.http.get(f"{admin.base}/docs/c/a/b").status_code == 404


def test_a_deleted_app_stops_serving_at_once_on_its_node(admin: Admin, user: httpx.Client) -> None:
    admin.script("s", "def handle(e, ctx):\n    return 'here'\n")
    admin.route("GET", "/x", "s")
    assert user.get(f"/apps/{admin.app_name}/x").text == "here"  # now cached
    assert admin.http.delete(admin.base).status_code == 204
    r = user.get(f"/apps/{admin.app_name}/x")
    assert r.status_code == 404, r.text


def test_async_route_is_202_and_its_execution_is_readable_at_once(
    admin: Admin, user: httpx.Client
) -> None:
    """202 with Location; the execution exists immediately and ends succeeded with a result."""
    admin.script("job", "def handle(e, ctx):\n    return {'n': e['json']['n'] * 2}\n")
    admin.route("POST", "/jobs", "job", mode="async")
    r = user.post(f"/apps/{admin.app_name}/jobs", json={"n": 21})
    assert r.status_code == 202
    body = r.json()
    assert set(body) == {"accepted_at", "execution_id"}
    assert r.headers["location"] == f"{admin.base}/executions/{body['execution_id']}"
    first = admin.get(f"/executions/{body['execution_id']}")
    assert first["status"] in {"queued", "running", "succeeded"}
    done = admin.wait(
        lambda: (
            (e := admin.get(f"/executions/{body['execution_id']}"))["status"] == "succeeded" and e
        )
    )
    assert done["result"]["body"] == '{"n":42}'
    assert done["source_kind"] == "http"


def test_the_access_log_names_a_requests_execution(
    server: Server, admin: Admin, user: httpx.Client
) -> None:
    """With PICLOUD_ACCESS_LOG=on, an async and a sync request each end with one
    line naming the execution they became; the query string stays out of it."""
    admin.script("logged", "def handle(e, ctx):\n    return 'ok'\n")
    admin.route("POST", "/logged/{x}", "logged", mode="async")
    admin.route("GET", "/logged/{x}", "logged")
    accepted = user.post(f"/apps/{admin.app_name}/logged/a%20b?key=s3cret", json={})
    assert accepted.status_code == 202
    assert user.get(f"/apps/{admin.app_name}/logged/c?key=s3cret").status_code == 200
    sync_id = admin.wait(
        lambda: [
            e["id"]
            for e in admin.executions(source_kind="http")
            if e["status"] == "succeeded" and e["id"] != accepted.json()["execution_id"]
        ][:1]
    )[0]
    lines = admin.wait(
        lambda: (
            [
                line
                for line in server.log().splitlines()
                if f"/apps/{admin.app_name}/logged/" in line
            ]
            if len(server.log().split(f"/apps/{admin.app_name}/logged/")) == 3
            else None
        )
    )
    assert f'"POST /apps/{admin.app_name}/logged/a%20b" 202 ' in lines[0]
    assert lines[0].endswith(f" ms execution={accepted.json()['execution_id']}")
    assert f'"GET /apps/{admin.app_name}/logged/c" 200 ' in lines[1]
    assert lines[1].endswith(f" ms execution={sync_id}")
    assert all("picloud.access" in line and "s3cret" not in line for line in lines)


def test_route_script_kv_write_fires_a_visible_trigger_execution(
    admin: Admin, user: httpx.Client
) -> None:
    """A KV write made by a route's script fires a KV trigger; its execution is visible."""
    admin.script("writer", "def handle(e, ctx):\n    ctx.kv.set('seen:' + e['params']['k'], 1)\n")
    admin.script(
        "audit",
        "def handle(e, ctx):\n    ctx.log('audit', e['key'])\n"
        "    ctx.docs.insert('audit', {'key': e['key'], 'depth': ctx.trigger_depth})\n",
    )
    admin.route("PUT", "/w/{k}", "writer")
    admin.post("/triggers/kv", {"script": "audit", "key_glob": "seen:*", "ops": ["set"]})
    assert user.put(f"/apps/{admin.app_name}/w/x").status_code == 204
    kv_exec = admin.wait(
        lambda: [e for e in admin.executions(source_kind="kv") if e["status"] == "succeeded"]
    )
    assert kv_exec[0]["trigger_depth"] == 1
    assert any("audit" in line and "seen:x" in line for line in kv_exec[0]["logs"])
    docs = admin.get("/docs/audit")["items"]
    assert [d["data"] for d in docs] == [{"key": "seen:x", "depth": 1}]


def test_docs_and_dead_letter_triggers(admin: Admin) -> None:
    """A docs trigger that rejects is dead-lettered; the dead-letter trigger handles it."""
    admin.script("picky", "def handle(e, ctx):\n    ctx.reject('no ' + e['op'])\n")
    admin.script(
        "dl", "def handle(e, ctx):\n    ctx.kv.set('dl', [e['source_kind'], e['error']['kind']])\n"
    )
    admin.post(
        "/triggers/docs", {"script": "picky", "collection_glob": "orders", "ops": ["insert"]}
    )
    admin.post("/triggers/dead-letter", {"script": "dl", "source_kinds": ["docs"]})
    admin.post("/docs/orders", {"total": 3})
    dead = admin.wait(lambda: admin.get("/dead-letters")["items"])
    assert dead[0]["source_kind"] == "docs"
    admin.wait(lambda: admin.http.get(f"{admin.base}/kv/dl").status_code == 200)
    assert admin.get("/kv/dl")["value"] == ["docs", "rejected"]


def test_sigterm_under_load_loses_nothing(pg_server: PgServer, tmp_path: Path) -> None:
    """Async requests accepted before SIGTERM all reach a final status after a restart."""
    name = pg_server.create_database(template=pg_server.template)
    url = pg_server.url(name)
    log = tmp_path / "picloud.log"
    final = {"succeeded", "failed", "dead_lettered", "skipped"}
    try:
        with serving(url, log) as first:
            admin = Admin(first)
            admin.script(
                "work",
                "import time\ndef handle(e, ctx):\n    time.sleep(0.05)\n"
                "    ctx.kv.set('done:' + str(e['json']['i']), 1)\n",
            )
            admin.route("POST", "/work", "work", mode="async")
            accepted = []
            with first.client() as c:
                for i in range(60):
                    r = c.post(f"/apps/{admin.app_name}/work", json={"i": i})
                    assert r.status_code == 202
                    accepted.append(r.json()["execution_id"])
            token, app_id = first.token, admin.app_id
            admin.http.close()
        # Stopped (exit 0) with work still queued or in flight; start again and drain.
        with serving(url, log, token=token) as second, second.client(headers=second.auth) as c:

            def all_final() -> bool:
                statuses = [
                    c.get(f"/api/v1/admin/apps/{app_id}/executions/{e}").json()["status"]
                    for e in accepted
                ]
                return all(s in final for s in statuses)

            deadline = time.monotonic() + 60
            while not all_final():
                assert time.monotonic() < deadline, "accepted work was lost"
                time.sleep(0.2)
            for i in range(60):
                assert c.get(f"/api/v1/admin/apps/{app_id}/kv/done:{i}").status_code == 200
    finally:
        pg_server.drop_database(name)


def test_two_nodes_on_one_database_form_a_cluster(pg_server: PgServer, tmp_path: Path) -> None:
    """Two `picloud serve` on one PostgreSQL: sync calls answer on either node, async work
    is shared and each request runs exactly once."""
    name = pg_server.create_database(template=pg_server.template)
    url = pg_server.url(name)
    try:
        with (
            serving(url, tmp_path / "a.log") as a,
            serving(url, tmp_path / "b.log", token=a.token) as b,
        ):
            admin = Admin(a)
            admin.script(
                "count",
                "def handle(e, ctx):\n    k = 'n:' + e['params']['i']\n"
                "    ctx.kv.set(k, (ctx.kv.get(k) or 0) + 1)\n    return {'i': e['params']['i']}\n",
            )
            admin.route("POST", "/sync/{i}", "count")
            admin.route("POST", "/async/{i}", "count", mode="async")
            with a.client() as ca, b.client() as cb:
                for i in range(20):
                    node = ca if i % 2 else cb
                    r = node.post(f"/apps/{admin.app_name}/sync/s{i}")
                    assert r.status_code == 200, r.text
                    assert r.json() == {"i": f"s{i}"}
                    assert node.post(f"/apps/{admin.app_name}/async/a{i}").status_code == 202
            admin.wait(lambda: len(admin.executions(status="succeeded")) == 40, timeout=60)
            for i in range(20):
                assert admin.get(f"/kv/n:s{i}")["value"] == 1
                assert admin.get(f"/kv/n:a{i}")["value"] == 1
            admin.http.close()
    finally:
        pg_server.drop_database(name)


def test_a_client_that_disconnects_leaves_an_abandoned_answer(
    pg_server: PgServer, tmp_path: Path
) -> None:
    """The caller gives up mid-wait: the script still runs to its end, but nothing it
    wrote is kept (its caller never had an answer), its record is failed, and its
    answer is recorded in abandoned_executions."""
    from sqlalchemy import create_engine, pool, text

    name = pg_server.create_database(template=pg_server.template)
    url = pg_server.url(name)
    try:
        with serving(url, tmp_path / "picloud.log") as server:
            admin = Admin(server)
            admin.script(
                "slow",
                "import time\ndef handle(e, ctx):\n"
                "    time.sleep(1.5)\n    ctx.kv.set('late', 1)\n    return 'late'\n",
            )
            admin.route("GET", "/slow", "slow")
            with pytest.raises(httpx.ReadTimeout):
                httpx.get(f"{server.base_url}/apps/{admin.app_name}/slow", timeout=0.5)
            done = admin.wait(lambda: admin.executions(status="failed"), timeout=30)
            assert done[0]["error"]["kind"] == "timeout", done
            assert admin.http.get(f"{admin.base}/kv/late").status_code == 404
            assert admin.executions(status="succeeded") == []
            admin.http.close()
        engine = create_engine(url, poolclass=pool.NullPool)
        try:
            with engine.connect() as conn:
                rows = conn.execute(
                    text("SELECT execution_id, reason FROM abandoned_executions")
                ).all()
        finally:
            engine.dispose()
        assert [(str(r.execution_id), r.reason) for r in rows] == [(done[0]["id"], "receiver gone")]
    finally:
        pg_server.drop_database(name)
