"""A tour of API.md through the real ``picloud serve`` binary, over HTTP.

API.md promises that everything in it is covered by tests that go through the real
server. The admin API's in-process tests (``tests/manager/api``) pin the details;
this module walks the same contract end to end: auth and capabilities, every admin
resource, pagination, executions and dead letters, the admin and user-route error
answers, and the script API (``ctx.kv``/``ctx.docs``) as a route's script sees it.

One server for the module; every test works in its own app (and its own users), so
tests do not see each other's data.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import httpx
import pytest

from tests.app.server import Server

PREFIX = "/api/v1/admin"
MIB = 1024 * 1024
T = TypeVar("T")

APP_CAPABILITIES = {
    "app_read",
    "app_delete",
    "app_manage_members",
    "app_manage_scripts",
    "app_manage_routes",
    "app_manage_triggers",
    "app_read_data",
    "app_write_data",
    "app_manage_dead_letters",
}
EXECUTION_FIELDS = {
    "id",
    "status",
    "source_kind",
    "attempts",
    "trigger_depth",
    "error",
    "logs",
    "result",
    "created_at",
    "started_at",
    "finished_at",
}


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def wait_for(check: Callable[[], T], timeout: float = 30, what: str = "condition") -> T:
    """Poll ``check`` until it answers something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} not met in {timeout} s"
        time.sleep(0.05)


def count(items: list[T], n: int) -> list[T] | None:
    """``items`` when there are exactly ``n`` of them (for :func:`wait_for`)."""
    return items if len(items) == n else None


def assert_error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """An admin error answer: ``status`` and exactly ``{"error": {"code", "message"}}``."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"]
    return dict(body["error"])


def assert_route_error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """A user-route failure: ``{"error": {"code", "message", "execution_id"}}``."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "execution_id"}, body
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    return dict(body["error"])


class Admin:
    """A client of the admin API as one user, working in one app it creates."""

    def __init__(self, server: Server, token: str | None = None) -> None:
        self.server = server
        self.token = token or server.token
        self.http = server.client(headers={"Authorization": f"Bearer {self.token}"})
        self.app_name = unique("tour")
        r = self.http.post(f"{PREFIX}/apps", json={"name": self.app_name})
        assert r.status_code == 201, r.text
        self.app = r.json()
        self.app_id = self.app["id"]
        self.base = f"{PREFIX}/apps/{self.app_id}"

    def close(self) -> None:
        self.http.close()

    def call(self, method: str, path: str, body: Any = None, **params: Any) -> httpx.Response:
        """One request to ``base + path`` (``body`` as JSON when given)."""
        kwargs: dict[str, Any] = {"params": params}
        if body is not None:
            kwargs["json"] = body
        return self.http.request(method, self.base + path, **kwargs)

    def ok(self, method: str, path: str, body: Any = None, expect: int = 200, **params: Any) -> Any:
        r = self.call(method, path, body, **params)
        assert r.status_code == expect, f"{method} {path}: {r.status_code} {r.text}"
        return r.json() if r.content else None

    def get(self, path: str, **params: Any) -> Any:
        return self.ok("GET", path, **params)

    def post(self, path: str, body: Any = None, expect: int = 201) -> Any:
        return self.ok("POST", path, body, expect=expect)

    def script(self, name: str, source: str, **extra: Any) -> dict[str, Any]:
        return dict(self.post("/scripts", {"name": name, "source": source, **extra}))

    def route(self, method: str, path: str, script: str, mode: str = "sync") -> dict[str, Any]:
        body = {"method": method, "path": path, "script": script, "dispatch_mode": mode}
        return dict(self.post("/routes", body))

    def walk(self, path: str, limit: int, **params: Any) -> tuple[list[dict[str, Any]], int]:
        """Every item of a list, following ``next_cursor`` until null; (items, pages)."""
        items: list[dict[str, Any]] = []
        cursor: str | None = None
        pages = 0
        while True:
            page = self.get(path, limit=limit, **params, **({"cursor": cursor} if cursor else {}))
            assert set(page) == {"items", "next_cursor"}, page
            assert len(page["items"]) <= limit
            items += page["items"]
            pages += 1
            cursor = page["next_cursor"]
            if cursor is None:
                return items, pages
            assert pages < 50, "pagination does not end"

    def executions(self, **params: Any) -> list[dict[str, Any]]:
        return list(self.get("/executions", **params)["items"])

    def execution(self, execution_id: str) -> dict[str, Any]:
        return dict(self.get(f"/executions/{execution_id}"))

    def finished(self, execution_id: str, timeout: float = 30) -> dict[str, Any]:
        """The execution once it has a final status."""
        final = {"succeeded", "failed", "dead_lettered", "skipped"}
        return wait_for(
            lambda: (e := self.execution(execution_id))["status"] in final and e,
            timeout,
            f"execution {execution_id} final",
        )


@pytest.fixture
def admin(server: Server) -> Iterator[Admin]:
    a = Admin(server)
    yield a
    a.close()


def new_user(server: Server, name: str | None = None) -> dict[str, Any]:
    """POST /users as the instance admin; the answer."""
    name = name or unique("user")
    with server.client(headers=server.auth) as c:
        r = c.post(f"{PREFIX}/users", json={"name": name})
    assert r.status_code == 201, r.text
    body = r.json()
    assert {"id", "name", "token"} <= set(body)
    assert body["name"] == name
    assert body["token"]
    uuid.UUID(body["id"])
    return dict(body)


# -- 1. auth and capabilities ---------------------------------------------------------


def test_admin_auth_users_and_member_capabilities(
    server: Server, admin: Admin, user: httpx.Client
) -> None:
    """401 without a valid token; a new user's token works; an app it is not a member
    of is 404; after PUT members it can read (200) and is 403 for what it lacks."""
    for headers in ({}, {"Authorization": "Bearer pc_wrong_token"}, {"Authorization": "Basic x"}):
        assert_error(user.get(f"{PREFIX}/apps", headers=headers), 401, "unauthenticated")
        assert_error(user.get(f"{admin.base}", headers=headers), 401, "unauthenticated")
    assert_error(user.post(f"{PREFIX}/users", json={"name": unique("x")}), 401, "unauthenticated")

    carol = new_user(server)
    assert carol["id"] != new_user(server)["id"]
    with server.client(headers={"Authorization": f"Bearer {carol['token']}"}) as c:
        listed = c.get(f"{PREFIX}/apps")
        assert listed.status_code == 200, listed.text
        assert listed.json() == {"items": [], "next_cursor": None}
        # Not a member: the app does not exist for carol.
        assert_error(c.get(admin.base), 404, "not_found")
        assert_error(c.get(f"{admin.base}/scripts"), 404, "not_found")
        # Only instance admins create users.
        assert_error(c.post(f"{PREFIX}/users", json={"name": unique("x")}), 403, "forbidden")

        granted = admin.ok(
            "PUT", f"/members/{carol['id']}", {"capabilities": ["app_read", "app_read_data"]}
        )
        assert granted == {
            "app_id": admin.app_id,
            "user_id": carol["id"],
            "name": carol["name"],
            "capabilities": ["app_read", "app_read_data"],
        }
        got = c.get(admin.base)
        assert got.status_code == 200, got.text
        assert got.json() == admin.app
        assert [a["id"] for a in c.get(f"{PREFIX}/apps").json()["items"]] == [admin.app_id]
        assert c.get(f"{admin.base}/scripts").status_code == 200
        assert c.get(f"{admin.base}/kv").status_code == 200
        # Capabilities carol lacks: 403, and nothing happened.
        assert_error(c.delete(admin.base), 403, "forbidden")
        assert_error(c.put(f"{admin.base}/kv/k", json=1), 403, "forbidden")
        assert_error(
            c.post(f"{admin.base}/scripts", json={"name": "s", "source": "x = 1"}),
            403,
            "forbidden",
        )
        assert_error(
            c.put(f"{admin.base}/members/{carol['id']}", json={"capabilities": ["app_delete"]}),
            403,
            "forbidden",
        )
        assert admin.get("") == admin.app
        assert admin.get("/kv")["items"] == []

        # An empty capability list removes the member: invisible again.
        admin.ok("PUT", f"/members/{carol['id']}", {"capabilities": []})
        assert_error(c.get(admin.base), 404, "not_found")


def test_a_script_rewritten_by_a_member_gets_only_that_members_data_rights(
    server: Server, admin: Admin, user: httpx.Client
) -> None:
    """The owner's route runs as the owner. A member who may manage scripts but not
    read data rewrites its script to return a secret: the read is refused inside the
    script (502 ``script_error``, no secret in it; the record says which right). The
    same code saved by the owner reads it. A trigger needs app_read_data from its
    registrant (403 without)."""
    admin.ok("PUT", "/kv/secret", {"pw": "hunter2"}, expect=201)
    admin.script("hello", "def handle(event, ctx):\n    return {'hi': 1}\n")
    admin.route("GET", "/hello", "hello")
    mallory = new_user(server)
    admin.ok("PUT", f"/members/{mallory['id']}", {"capabilities": ["app_manage_scripts"]})
    steal = "def handle(event, ctx):\n    return {'stolen': ctx.kv.get('secret')}\n"
    with server.client(headers={"Authorization": f"Bearer {mallory['token']}"}) as c:
        saved = c.put(f"{admin.base}/scripts/hello", json={"source": steal})
        assert saved.status_code == 200, saved.text
        assert saved.json()["data_capabilities"] == []
    url = f"/apps/{admin.app_name}/hello"
    wait_for(lambda: user.get(url).status_code != 200, 10, "the new version served")
    refused = user.get(url)
    execution_id = assert_route_error(refused, 502, "script_error")["execution_id"]
    assert "hunter2" not in refused.text
    record = admin.ok("GET", f"/executions/{execution_id}")
    assert "app_read_data" in record["error"]["message"]

    saved = admin.ok("PUT", "/scripts/hello", {"source": steal})
    assert saved["data_capabilities"] == ["app_read_data", "app_write_data"]
    assert user.get(url).json() == {"stolen": {"pw": "hunter2"}}

    spy = new_user(server)
    admin.ok(
        "PUT",
        f"/members/{spy['id']}",
        {"capabilities": ["app_manage_triggers", "app_manage_scripts", "app_read"]},
    )
    with server.client(headers={"Authorization": f"Bearer {spy['token']}"}) as c:
        r = c.post(f"{admin.base}/triggers/kv", json={"script": "hello", "key_glob": "*"})
    assert_error(r, 403, "forbidden")
    assert admin.get("/triggers")["items"] == []


def test_creator_holds_every_capability(server: Server) -> None:
    """POST /apps by any user; the creator may do everything, including granting."""
    dave = new_user(server)
    erin = new_user(server)
    owner = Admin(server, dave["token"])
    try:
        r = owner.ok("PUT", f"/members/{erin['id']}", {"capabilities": sorted(APP_CAPABILITIES)})
        assert set(r["capabilities"]) == APP_CAPABILITIES
        with server.client(headers={"Authorization": f"Bearer {erin['token']}"}) as c:
            assert c.get(owner.base).json()["name"] == owner.app_name
            assert c.delete(owner.base).status_code == 204
        assert_error(owner.call("GET", ""), 404, "not_found")
    finally:
        owner.close()


# -- 2. apps --------------------------------------------------------------------------


def test_apps_create_conflict_paginate_get_delete(server: Server) -> None:
    """POST 201, 409 on a taken name, paginated GET, GET one, DELETE, then 404."""
    frank = new_user(server)
    headers = {"Authorization": f"Bearer {frank['token']}"}
    stem = unique("pages")
    with server.client(headers=headers) as c:
        created = []
        for suffix in ("c", "a", "b"):
            r = c.post(f"{PREFIX}/apps", json={"name": f"{stem}-{suffix}"})
            assert r.status_code == 201, r.text
            body = r.json()
            assert set(body) == {
                "id",
                "name",
                "created_at",
                "storage_bytes",
                "storage_quota_bytes",
            }
            assert body["name"] == f"{stem}-{suffix}"
            assert (body["storage_bytes"], body["storage_quota_bytes"]) == (0, 1024**3)
            uuid.UUID(body["id"])
            created.append(body)
        # Taken names: 409 for the creator and for anyone else.
        assert_error(c.post(f"{PREFIX}/apps", json={"name": f"{stem}-a"}), 409, "conflict")
        with server.client(headers=server.auth) as root:
            assert_error(root.post(f"{PREFIX}/apps", json={"name": f"{stem}-b"}), 409, "conflict")
        assert_error(c.post(f"{PREFIX}/apps", json={"name": "Bad_Name"}), 422, "invalid_name")

        seen: list[dict[str, Any]] = []
        cursor: str | None = None
        pages = 0
        while True:
            params = {"limit": "1", **({"cursor": cursor} if cursor else {})}
            page = c.get(f"{PREFIX}/apps", params=params).json()
            assert set(page) == {"items", "next_cursor"}
            assert len(page["items"]) == 1
            seen += page["items"]
            pages += 1
            cursor = page["next_cursor"]
            if cursor is None:
                break
            assert pages < 10
        assert pages == 3
        assert [a["name"] for a in seen] == [f"{stem}-a", f"{stem}-b", f"{stem}-c"]
        assert sorted(seen, key=lambda a: a["name"]) == sorted(created, key=lambda a: a["name"])

        one = created[1]
        assert c.get(f"{PREFIX}/apps/{one['id']}").json() == one
        r = c.delete(f"{PREFIX}/apps/{one['id']}")
        assert (r.status_code, r.content) == (204, b"")
        assert_error(c.get(f"{PREFIX}/apps/{one['id']}"), 404, "not_found")
        assert_error(c.delete(f"{PREFIX}/apps/{one['id']}"), 404, "not_found")
        names = [a["name"] for a in c.get(f"{PREFIX}/apps").json()["items"]]
        assert names == sorted(a["name"] for a in created if a["id"] != one["id"])
        # The name is free again.
        assert c.post(f"{PREFIX}/apps", json={"name": one["name"]}).status_code == 201


# -- 3. scripts -----------------------------------------------------------------------


def test_scripts_crud_and_source_limit(admin: Admin, user: httpx.Client) -> None:
    """POST 201, PUT bumps version, GET one/list, DELETE then 404; 256 KiB source cap."""
    v1 = "def handle(e, ctx):\n    return 'v1'\n"
    v2 = "def handle(e, ctx):\n    return 'v2'\n"
    created = admin.script("hello", v1, timeout_seconds=5)
    assert {k: created[k] for k in ("name", "version", "timeout_seconds", "memory_limit_mb")} == {
        "name": "hello",
        "version": 1,
        "timeout_seconds": 5,
        "memory_limit_mb": 128,
    }
    uuid.UUID(created["id"])
    assert_error(admin.call("POST", "/scripts", {"name": "hello", "source": v1}), 409, "conflict")
    assert admin.get("/scripts/hello") == {**created, "source": v1}

    admin.route("GET", "/hello", "hello")
    assert user.get(f"/apps/{admin.app_name}/hello").text == "v1"
    updated = admin.ok("PUT", "/scripts/hello", {"source": v2})
    assert (updated["id"], updated["version"], updated["timeout_seconds"]) == (created["id"], 2, 5)
    assert admin.get("/scripts/hello")["source"] == v2
    # The new version serves (the route cache may hold the old target for ~1 s).
    wait_for(lambda: user.get(f"/apps/{admin.app_name}/hello").text == "v2", 10, "v2 served")

    other = admin.script("other", v1)
    assert admin.get("/scripts") == {"items": [updated, other], "next_cursor": None}
    page = admin.get("/scripts", limit=1)
    assert page["items"] == [updated]
    assert admin.get("/scripts", limit=1, cursor=page["next_cursor"]) == {
        "items": [other],
        "next_cursor": None,
    }

    r = admin.call("DELETE", "/scripts/other")
    assert (r.status_code, r.content) == (204, b"")
    assert_error(admin.call("GET", "/scripts/other"), 404, "not_found")
    assert_error(admin.call("DELETE", "/scripts/other"), 404, "not_found")
    assert_error(admin.call("PUT", "/scripts/other", {"source": v1}), 404, "not_found")
    # In use by a route: 409.
    assert_error(admin.call("DELETE", "/scripts/hello"), 409, "conflict")

    big = "#" * (256 * 1024 + 1)
    r = admin.call("POST", "/scripts", {"name": "big", "source": big})
    assert 400 <= r.status_code < 500
    assert_error(r, 413, "payload_too_large")
    assert_error(admin.call("PUT", "/scripts/hello", {"source": big}), 413, "payload_too_large")
    assert_error(admin.call("GET", "/scripts/big"), 404, "not_found")
    assert admin.get("/scripts/hello")["version"] == 2
    assert admin.script("edge", "#" * (256 * 1024))["version"] == 1
    for field, value in [("timeout_seconds", 0), ("timeout_seconds", 301), ("memory_limit_mb", 15)]:
        r = admin.call("POST", "/scripts", {"name": "lim", "source": v1, field: value})
        assert_error(r, 422, "limit_exceeded")


# -- 4. routes ------------------------------------------------------------------------


def test_routes_create_conflict_list_delete(admin: Admin, user: httpx.Client) -> None:
    """POST 201, 409 on the same method and path, GET list, DELETE then 404."""
    admin.script("s", "def handle(e, ctx):\n    return {'p': e['params']}\n")
    created = admin.route("get", "/items/{id}", "s")
    assert {k: created[k] for k in ("method", "path", "script", "dispatch_mode")} == {
        "method": "GET",
        "path": "/items/{id}",
        "script": "s",
        "dispatch_mode": "sync",
    }
    uuid.UUID(created["id"])
    body = {"method": "GET", "path": "/items/{id}", "script": "s"}
    assert_error(admin.call("POST", "/routes", body), 409, "conflict")
    other = admin.route("POST", "/items/{id}", "s", mode="async")
    assert other["dispatch_mode"] == "async"
    bad = {"method": "GET", "path": "/x", "script": "missing"}
    assert_error(admin.call("POST", "/routes", bad), 422, "unknown_script")

    assert admin.get("/routes") == {"items": [created, other], "next_cursor": None}
    assert user.get(f"/apps/{admin.app_name}/items/7").json() == {"p": {"id": "7"}}

    r = admin.call("DELETE", f"/routes/{created['id']}")
    assert (r.status_code, r.content) == (204, b"")
    assert_error(admin.call("DELETE", f"/routes/{created['id']}"), 404, "not_found")
    assert admin.get("/routes") == {"items": [other], "next_cursor": None}
    # The deleted route stops serving (after the route cache's short TTL): GET is now
    # a 405 on a path that only POST serves.
    wait_for(
        lambda: user.get(f"/apps/{admin.app_name}/items/7").status_code == 405, 10, "route gone"
    )


# -- 5. triggers ----------------------------------------------------------------------


def test_triggers_of_each_kind(admin: Admin) -> None:
    """kv, docs and dead-letter triggers: POST 201 with their kind, GET list, DELETE."""
    admin.script("s", "def handle(e, ctx):\n    return None\n")
    kv = admin.post("/triggers/kv", {"script": "s", "key_glob": "orders/*", "ops": ["set"]})
    docs = admin.post(
        "/triggers/docs",
        {"script": "s", "collection_glob": "orders", "retry": {"max_attempts": 2}},
    )
    dl = admin.post("/triggers/dead-letter", {"script": "s", "source_kinds": ["kv"]})
    assert (kv["kind"], kv["key_glob"], kv["ops"]) == ("kv", "orders/*", ["set"])
    assert (docs["kind"], docs["collection_glob"], docs["ops"]) == ("docs", "orders", [])
    assert (dl["kind"], dl["source_kinds"]) == ("dead_letter", ["kv"])
    assert kv["retry"] == {
        "backoff": "exponential",
        "base_delay_ms": 1000,
        "max_delay_ms": 300000,
        "max_attempts": 5,
        "jitter": 0.2,
    }
    assert docs["retry"] == {**kv["retry"], "max_attempts": 2}
    ids = {t["id"] for t in (kv, docs, dl)}
    assert len(ids) == 3

    listed = admin.get("/triggers")
    assert listed["next_cursor"] is None
    assert sorted(listed["items"], key=lambda t: t["id"]) == sorted(
        [kv, docs, dl], key=lambda t: t["id"]
    )
    items, pages = admin.walk("/triggers", 2)
    assert (sorted(t["id"] for t in items), pages) == (sorted(ids), 2)

    assert_error(
        admin.call("POST", "/triggers/kv", {"script": "s", "key_glob": ""}), 422, "invalid_glob"
    )
    r = admin.call("POST", "/triggers/kv", {"script": "s", "key_glob": "x" * 257})
    assert r.status_code == 422
    r = admin.call("POST", "/triggers/kv", {"script": "s", "key_glob": "x", "ops": ["insert"]})
    assert r.status_code == 422
    assert_error(
        admin.call(
            "POST", "/triggers/kv", {"script": "s", "key_glob": "x", "retry": {"max_attempts": 0}}
        ),
        422,
        "invalid_retry_policy",
    )

    # A script a trigger uses cannot be deleted until the trigger goes.
    assert_error(admin.call("DELETE", "/scripts/s"), 409, "conflict")
    for trigger in (kv, docs, dl):
        r = admin.call("DELETE", f"/triggers/{trigger['id']}")
        assert (r.status_code, r.content) == (204, b"")
    assert_error(admin.call("DELETE", f"/triggers/{kv['id']}"), 404, "not_found")
    assert admin.get("/triggers") == {"items": [], "next_cursor": None}
    assert admin.call("DELETE", "/scripts/s").status_code == 204


# -- 6. KV ----------------------------------------------------------------------------


def test_kv_put_get_delete_list_and_paginate(admin: Admin) -> None:
    """PUT/GET/DELETE a key, ``?prefix=`` listing, ``?limit=&cursor=`` pages."""
    first = admin.ok("PUT", "/kv/users/42", {"n": 1}, expect=201)
    assert first == {"key": "users/42", "value": {"n": 1}, "version": 1}
    second = admin.ok("PUT", "/kv/users/42", [1, "two", None])
    assert second == {"key": "users/42", "value": [1, "two", None], "version": 2}
    assert admin.get("/kv/users/42") == second
    assert admin.ok("PUT", "/kv/flag", False, expect=201) == {
        "key": "flag",
        "value": False,
        "version": 1,
    }

    for i in range(5):
        admin.ok("PUT", f"/kv/p/{i}", i * 10, expect=201)
    listed = admin.get("/kv", prefix="p/")
    assert listed["next_cursor"] is None
    assert [(e["key"], e["value"]) for e in listed["items"]] == [
        (f"p/{i}", i * 10) for i in range(5)
    ]
    items, pages = admin.walk("/kv", 2, prefix="p/")
    assert (items, pages) == (listed["items"], 3)
    everything, _ = admin.walk("/kv", 3)
    assert [e["key"] for e in everything] == ["flag", *[f"p/{i}" for i in range(5)], "users/42"]
    assert admin.get("/kv", prefix="nothing/") == {"items": [], "next_cursor": None}

    r = admin.call("DELETE", "/kv/users/42")
    assert (r.status_code, r.content) == (204, b"")
    assert_error(admin.call("GET", "/kv/users/42"), 404, "not_found")
    assert_error(admin.call("DELETE", "/kv/users/42"), 404, "not_found")
    assert_error(admin.call("PUT", "/kv/big", "x" * (256 * 1024)), 413, "payload_too_large")
    assert_error(admin.call("PUT", "/kv/" + "k" * 513, 1), 422, "limit_exceeded")
    assert admin.ok("PUT", "/kv/" + "k" * 512, 1, expect=201)["version"] == 1
    assert_error(admin.call("GET", "/kv/big"), 404, "not_found")


# -- 7. docs --------------------------------------------------------------------------


def test_docs_insert_put_get_delete_and_paginate(admin: Admin) -> None:
    """POST 201 ``{"id", "data"}``, PUT (200 replace, 201 create), GET, DELETE, pages."""
    created = admin.post("/docs/things", {"a": 1, "tags": ["x"]})
    assert set(created) == {"id", "data"}
    assert created["data"] == {"a": 1, "tags": ["x"]}
    doc_id = created["id"]
    assert admin.get(f"/docs/things/{doc_id}") == created
    replaced = admin.ok("PUT", f"/docs/things/{doc_id}", {"a": 2})
    assert replaced == {"id": doc_id, "data": {"a": 2}}
    assert admin.get(f"/docs/things/{doc_id}") == replaced
    for i in range(4):
        fresh = admin.ok("PUT", f"/docs/things/d{i}", {"i": i}, expect=201)
        assert fresh == {"id": f"d{i}", "data": {"i": i}}
    admin.post("/docs/others", {"elsewhere": True})

    listed = admin.get("/docs/things")
    assert listed["next_cursor"] is None
    assert sorted(d["id"] for d in listed["items"]) == sorted([doc_id, "d0", "d1", "d2", "d3"])
    assert {d["id"]: d["data"] for d in listed["items"]}[doc_id] == {"a": 2}
    items, pages = admin.walk("/docs/things", 2)
    assert (items, pages) == (listed["items"], 3)

    r = admin.call("DELETE", "/docs/things/d1")
    assert (r.status_code, r.content) == (204, b"")
    assert_error(admin.call("GET", "/docs/things/d1"), 404, "not_found")
    assert_error(admin.call("DELETE", "/docs/things/d1"), 404, "not_found")
    assert len(admin.get("/docs/things")["items"]) == 4
    assert [d["data"] for d in admin.get("/docs/others")["items"]] == [{"elsewhere": True}]
    assert_error(admin.call("POST", "/docs/things", [1, 2]), 422, "invalid_input")
    assert admin.call("POST", "/docs/bad.name", {"a": 1}).status_code == 422


# -- 8. executions --------------------------------------------------------------------

RAISES = "def handle(e, ctx):\n    raise ValueError('boom ' + str(e.get('key')))\n"


def test_executions_filters_fields_pagination_and_retrying(
    admin: Admin, user: httpx.Client
) -> None:
    """List by ``status`` and ``source_kind``, the documented fields of one execution,
    pages, and a ``retrying`` trigger execution (long retry delay)."""
    admin.script(
        "ok",
        "def handle(e, ctx):\n    ctx.log('hello', e['params']['n'])\n"
        "    return {'n': e['params']['n']}\n",
    )
    admin.script("bad", RAISES)
    admin.route("GET", "/ok/{n}", "ok")
    admin.route("GET", "/bad", "bad")
    admin.post(
        "/triggers/kv",
        {
            "script": "bad",
            "key_glob": "retry/*",
            "retry": {"backoff": "constant", "base_delay_ms": 60000, "max_attempts": 5},
        },
    )
    for n in range(3):
        r = user.get(f"/apps/{admin.app_name}/ok/{n}")
        assert (r.status_code, r.json()) == (200, {"n": str(n)})
    failed = user.get(f"/apps/{admin.app_name}/bad")
    failed_id = assert_route_error(failed, 502, "script_error")["execution_id"]
    admin.ok("PUT", "/kv/retry/1", {"v": 1}, expect=201)

    retrying = wait_for(lambda: admin.executions(status="retrying"), 30, "a retrying execution")
    assert len(retrying) == 1
    r1 = retrying[0]
    assert set(r1) == EXECUTION_FIELDS
    assert (r1["status"], r1["source_kind"], r1["attempts"]) == ("retrying", "kv", 1)
    assert r1["error"]["kind"] == "uncaught_exception"
    assert "boom retry/1" in r1["error"]["message"]
    assert r1["finished_at"] is None
    assert admin.execution(r1["id"]) == r1

    succeeded = wait_for(
        lambda: count(admin.executions(status="succeeded"), 3),
        30,
        "three succeeded",
    )
    assert {e["status"] for e in succeeded} == {"succeeded"}
    assert {e["source_kind"] for e in succeeded} == {"http"}
    one = admin.execution(succeeded[0]["id"])
    assert set(one) == EXECUTION_FIELDS
    assert one == succeeded[0]
    assert (one["attempts"], one["trigger_depth"], one["error"]) == (1, 0, None)
    assert one["finished_at"] is not None
    assert one["finished_at"] >= one["created_at"]
    n = one["logs"][0].split()[-1]
    assert one["logs"] == [f"hello {n}"]
    assert one["result"]["status"] == 200
    assert one["result"]["body"] == f'{{"n":"{n}"}}'

    bad = admin.finished(failed_id)
    assert set(bad) == EXECUTION_FIELDS
    assert (bad["status"], bad["source_kind"]) == ("failed", "http")
    assert bad["error"]["kind"] == "uncaught_exception"
    assert "boom" in bad["error"]["message"]
    assert [e["id"] for e in admin.executions(status="failed")] == [failed_id]

    http = admin.executions(source_kind="http")
    assert sorted(e["id"] for e in http) == sorted([failed_id, *(e["id"] for e in succeeded)])
    assert [e["id"] for e in admin.executions(source_kind="kv")] == [r1["id"]]
    assert admin.executions(source_kind="docs") == []
    assert admin.executions(status="succeeded", source_kind="kv") == []
    assert [e["id"] for e in admin.executions(status="retrying", source_kind="kv")] == [r1["id"]]

    everything = admin.get("/executions")
    assert everything["next_cursor"] is None
    assert len(everything["items"]) == 5
    items, pages = admin.walk("/executions", 2)
    assert ([e["id"] for e in items], pages) == ([e["id"] for e in everything["items"]], 3)
    http_items, http_pages = admin.walk("/executions", 3, source_kind="http")
    assert (len(http_items), http_pages) == (4, 2)

    assert_error(admin.call("GET", "/executions", status="done"), 422, "invalid_input")
    assert_error(admin.call("GET", "/executions", source_kind="cron"), 422, "invalid_input")
    assert_error(admin.call("GET", f"/executions/{uuid.uuid4()}"), 404, "not_found")


# -- 9. dead letters ------------------------------------------------------------------


def test_dead_letters_list_replay_resolve(admin: Admin) -> None:
    """A rejecting trigger dead-letters at once (no retry), as does a failing one with
    max_attempts 1; list them, replay one (202, readable at once, it runs again), and
    resolve another."""
    admin.script(
        "picky",
        "def handle(e, ctx):\n"
        "    if not ctx.kv.get('allow'):\n"
        "        ctx.reject('not yet ' + e['key'])\n"
        "    ctx.kv.set('handled/' + e['key'], e['value'])\n",
    )
    admin.script("bad", RAISES)
    admin.post("/triggers/kv", {"script": "picky", "key_glob": "job/*", "ops": ["set"]})
    admin.post(
        "/triggers/kv", {"script": "bad", "key_glob": "once/*", "retry": {"max_attempts": 1}}
    )
    admin.ok("PUT", "/kv/job/1", {"n": 1}, expect=201)
    admin.ok("PUT", "/kv/job/2", {"n": 2}, expect=201)
    admin.ok("PUT", "/kv/once/1", 1, expect=201)

    letters = wait_for(
        lambda: count(admin.get("/dead-letters")["items"], 3),
        30,
        "three dead letters",
    )
    by_key = {d["payload"]["key"]: d for d in letters}
    assert set(by_key) == {"job/1", "job/2", "once/1"}
    for key in ("job/1", "job/2"):
        d = by_key[key]
        assert (d["source_kind"], d["attempts"], d["resolution"]) == ("kv", 1, None)
        assert d["error"]["kind"] == "rejected"
        assert d["error"]["message"] == f"not yet {key}"
        value = {"n": int(key[-1])}
        assert d["payload"] == {
            "kind": "kv",
            "key": key,
            "op": "set",
            "value": value,
            "prev_value": None,
        }
        execution = admin.execution(d["execution_id"])
        assert (execution["status"], execution["attempts"]) == ("dead_lettered", 1)
        assert execution["error"]["kind"] == "rejected"
    once = by_key["once/1"]
    assert (once["attempts"], once["error"]["kind"]) == (1, "uncaught_exception")
    assert admin.execution(once["execution_id"])["status"] == "dead_lettered"
    assert [d["status"] for d in admin.executions(status="dead_lettered")] == ["dead_lettered"] * 3
    items, pages = admin.walk("/dead-letters", 2)
    assert ([d["id"] for d in items], pages) == ([d["id"] for d in letters], 2)

    # Replay: 202 {"execution_id"}, readable at once; now allowed, it succeeds.
    admin.ok("PUT", "/kv/allow", True, expect=201)
    replay = admin.post(f"/dead-letters/{by_key['job/1']['id']}/replay", expect=202)
    assert set(replay) == {"execution_id"}
    first = admin.execution(replay["execution_id"])
    assert first["status"] in {"queued", "running", "succeeded"}
    assert first["source_kind"] == "kv"
    done = admin.finished(replay["execution_id"])
    assert done["status"] == "succeeded", done
    assert admin.get("/kv/handled/job/1")["value"] == {"n": 1}
    assert_error(admin.call("GET", "/kv/handled/job/2"), 404, "not_found")
    assert_error(
        admin.call("POST", f"/dead-letters/{by_key['job/1']['id']}/replay"), 409, "conflict"
    )

    resolved = admin.post(f"/dead-letters/{by_key['job/2']['id']}/resolve", expect=200)
    assert (resolved["id"], resolved["resolution"]) == (by_key["job/2"]["id"], "resolved")
    assert resolved["resolved_at"] is not None
    after = {d["id"]: d["resolution"] for d in admin.get("/dead-letters")["items"]}
    assert after == {
        by_key["job/1"]["id"]: "replayed",
        by_key["job/2"]["id"]: "resolved",
        once["id"]: None,
    }
    assert_error(admin.call("POST", f"/dead-letters/{uuid.uuid4()}/resolve"), 404, "not_found")
    assert_error(admin.call("POST", f"/dead-letters/{uuid.uuid4()}/replay"), 404, "not_found")


# -- 10. admin errors -----------------------------------------------------------------


def test_admin_error_answers(server: Server, admin: Admin) -> None:
    """Unknown app 404, unknown path 404, wrong method 405 with Allow, body over 1 MiB
    413, invalid JSON 422: all with the admin error body."""
    http = admin.http
    assert_error(http.get(f"{PREFIX}/apps/{uuid.uuid4()}"), 404, "not_found")
    assert_error(http.get(f"{PREFIX}/apps/not-a-uuid"), 404, "not_found")
    assert_error(http.get(f"{PREFIX}/apps/{uuid.uuid4()}/scripts"), 404, "not_found")
    assert_error(http.get(f"{PREFIX}/nope/nothing"), 404, "not_found")

    r = http.patch(admin.base, json={})
    assert_error(r, 405, "method_not_allowed")
    assert r.headers["allow"] == "DELETE, GET"
    r = http.delete(f"{PREFIX}/users")
    assert_error(r, 405, "method_not_allowed")
    assert r.headers["allow"] == "GET, POST"

    core = b'{"name": "padded"}'
    r = http.post(
        f"{PREFIX}/apps",
        content=core + b" " * (MIB + 1 - len(core)),
        headers={"content-type": "application/json"},
    )
    assert_error(r, 413, "payload_too_large")
    big_doc = {"blob": "x" * MIB}
    assert_error(admin.call("POST", "/docs/things", big_doc), 413, "payload_too_large")
    r = http.post(f"{PREFIX}/apps", content=b"{nope", headers={"content-type": "application/json"})
    assert_error(r, 422, "invalid_input")
    assert_error(http.get(f"{PREFIX}/apps", params={"limit": "0"}), 422, "invalid_input")
    assert_error(http.get(f"{PREFIX}/apps", params={"cursor": "!!!"}), 422, "invalid_input")
    # Nothing was created by the refused requests.
    assert admin.get("/docs/things")["items"] == []


# -- 11. user routes ------------------------------------------------------------------


def test_user_route_errors_before_any_execution(admin: Admin, user: httpx.Client) -> None:
    """Unknown app or route 404, other method 405 with Allow, body over 1 MiB 413; none
    of them runs anything."""
    admin.script("echo", "def handle(e, ctx):\n    return len(e['body'])\n")
    admin.route("GET", "/r/{x}", "echo")
    admin.route("PUT", "/r/{x}", "echo")
    admin.route("POST", "/up", "echo")

    err = assert_route_error(user.get(f"/apps/{unique('missing')}/r/1"), 404, "not_found")
    assert err["execution_id"] is None
    err = assert_route_error(user.get("/apps/Not_An_App/r/1"), 404, "not_found")
    assert err["execution_id"] is None
    err = assert_route_error(user.get(f"/apps/{admin.app_name}/nope"), 404, "not_found")
    assert err["execution_id"] is None
    assert_route_error(user.get(f"/apps/{admin.app_name}/r/1/deeper"), 404, "not_found")

    r = user.delete(f"/apps/{admin.app_name}/r/1")
    err = assert_route_error(r, 405, "method_not_allowed")
    assert err["execution_id"] is None
    assert r.headers["allow"] == "GET, HEAD, PUT"
    r = user.get(f"/apps/{admin.app_name}/up")
    assert_route_error(r, 405, "method_not_allowed")
    assert r.headers["allow"] == "POST"

    r = user.post(f"/apps/{admin.app_name}/up", content=b"x" * (MIB + 1))
    err = assert_route_error(r, 413, "payload_too_large")
    assert err["execution_id"] is None
    assert admin.executions() == []

    # Exactly 1 MiB is accepted and reaches the script.
    r = user.post(f"/apps/{admin.app_name}/up", content=b"x" * MIB)
    assert (r.status_code, r.json()) == (200, MIB)
    assert len(admin.executions()) == 1


@pytest.mark.parametrize(
    ("source", "status", "code", "kind"),
    [
        ("import os\ndef handle(e, ctx):\n    os._exit(3)\n", 500, "internal", "worker_crash"),
        (
            "def handle(e, ctx):\n    return ctx.response('x' * (1024 * 1024 + 1))\n",
            507,
            "resource_exhausted",
            "output_limit",
        ),
        (
            "def handle(e, ctx):\n    return 'x' * (1024 * 1024 + 1)\n",
            507,
            "resource_exhausted",
            "output_limit",
        ),
        ("def handle(e, ctx):\n    return object()\n", 502, "script_error", "invalid_return"),
        ("def handler(e, ctx):\n    return 1\n", 502, "script_error", "missing_handler"),
    ],
    ids=["worker-crash", "response-too-large", "return-too-large", "invalid-return", "no-handle"],
)
def test_user_route_failure_statuses(
    admin: Admin, user: httpx.Client, source: str, status: int, code: str, kind: str
) -> None:
    """Failure kinds test_e2e's table does not cover: each answers its status with
    ``{"error": {"code", "message", "execution_id"}}`` and a failed execution."""
    admin.script("s", source)
    admin.route("GET", "/f", "s")
    r = user.get(f"/apps/{admin.app_name}/f")
    err = assert_route_error(r, status, code)
    execution = admin.finished(err["execution_id"])
    assert execution["status"] == "failed"
    assert execution["error"]["kind"] == kind
    assert execution["source_kind"] == "http"
    # The pool recovers: the next request on the app is served normally.
    admin.script("fine", "def handle(e, ctx):\n    return 'fine'\n")
    admin.route("GET", "/fine", "fine")
    assert user.get(f"/apps/{admin.app_name}/fine").text == "fine"


def test_an_exactly_one_mib_response_is_served(admin: Admin, user: httpx.Client) -> None:
    """The response cap is inclusive: a 1 MiB body is answered in full."""
    admin.script("s", "def handle(e, ctx):\n    return 'y' * (1024 * 1024)\n")
    admin.route("GET", "/big", "s")
    r = user.get(f"/apps/{admin.app_name}/big")
    assert r.status_code == 200
    assert len(r.content) == MIB


# -- 12. the script API ---------------------------------------------------------------

SCRIPT_API = """
def handle(event, ctx):
    seen = {}
    ctx.kv.set('a/1', {'n': 1})
    ctx.kv.set('a/2', [2])
    ctx.kv.set('b', 'bee')
    seen['get'] = ctx.kv.get('a/1')
    seen['missing'] = ctx.kv.get('nope')
    seen['list'] = ctx.kv.list(prefix='a/')
    seen['list_limited'] = ctx.kv.list(limit=1)
    seen['deleted'] = ctx.kv.delete('a/2')
    seen['deleted_again'] = ctx.kv.delete('a/2')
    seen['keys_after'] = [e['key'] for e in ctx.kv.list()]
    ann = ctx.docs.insert('people', {'name': 'ann', 'age': 3})
    bob = ctx.docs.insert('people', {'name': 'bob', 'age': 3}, id='bob')
    cid = ctx.docs.insert('people', {'name': 'cid', 'age': 9}, id='cid')
    ctx.docs.update('people', ann, {'name': 'ann', 'age': 4})
    seen['ann_id_is_text'] = isinstance(ann, str) and len(ann) > 0
    seen['bob_id'] = bob
    seen['ann'] = ctx.docs.get('people', ann)
    seen['no_doc'] = ctx.docs.get('people', 'nobody')
    seen['age3'] = ctx.docs.query('people', where={'age': 3})
    seen['all_names'] = sorted(d['data']['name'] for d in ctx.docs.query('people'))
    seen['query_limited'] = len(ctx.docs.query('people', limit=2))
    seen['docs_deleted'] = ctx.docs.delete('people', cid)
    seen['docs_deleted_again'] = ctx.docs.delete('people', cid)
    seen['cid_gone'] = ctx.docs.get('people', cid)
    try:
        ctx.docs.update('people', 'nobody', {'x': 1})
        seen['update_missing'] = 'no error'
    except ctx.Error as exc:
        seen['update_missing'] = exc.code
    seen['limits'] = []
    for call in (
        lambda: ctx.kv.set('big', 'x' * (256 * 1024)),
        lambda: ctx.kv.set('k' * 513, 1),
        lambda: ctx.docs.insert('people', {'blob': 'x' * (1024 * 1024)}),
    ):
        try:
            call()
            seen['limits'].append('no error')
        except ctx.Error as exc:
            seen['limits'].append(exc.code)
    seen['ctx'] = {
        'app': ctx.app,
        'attempt': ctx.attempt,
        'trigger_depth': ctx.trigger_depth,
        'execution_id': ctx.execution_id,
        'principal_is_text': isinstance(ctx.principal, str),
    }
    ctx.log('tour', 'done', 3)
    return seen
"""


def test_script_api_from_a_route(admin: Admin, user: httpx.Client) -> None:
    """A route's script uses ctx.kv and ctx.docs; what it saw, and what it left."""
    admin.script("api", SCRIPT_API)
    admin.route("POST", "/api", "api")
    r = user.post(f"/apps/{admin.app_name}/api")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].split(";")[0] == "application/json"
    seen = r.json()
    execution_id = seen["ctx"].pop("execution_id")
    assert seen["ctx"] == {
        "app": admin.app_name,
        "attempt": 1,
        "trigger_depth": 0,
        "principal_is_text": True,
    }
    assert seen["get"] == {"n": 1}
    assert seen["missing"] is None
    assert seen["list"] == [{"key": "a/1", "value": {"n": 1}}, {"key": "a/2", "value": [2]}]
    assert seen["list_limited"] == [{"key": "a/1", "value": {"n": 1}}]
    assert (seen["deleted"], seen["deleted_again"]) == (True, False)
    assert seen["keys_after"] == ["a/1", "b"]
    assert seen["ann_id_is_text"] is True
    assert seen["bob_id"] == "bob"
    assert seen["ann"] == {"name": "ann", "age": 4}
    assert seen["no_doc"] is None
    assert seen["age3"] == [{"id": "bob", "data": {"name": "bob", "age": 3}}]
    assert seen["all_names"] == ["ann", "bob", "cid"]
    assert seen["query_limited"] == 2
    assert (seen["docs_deleted"], seen["docs_deleted_again"]) == (True, False)
    assert seen["cid_gone"] is None
    assert seen["update_missing"] == "not_found"
    assert seen["limits"] == ["payload_too_large", "limit_exceeded", "payload_too_large"]

    # What the script left is what the admin API reads.
    assert [(e["key"], e["value"]) for e in admin.get("/kv")["items"]] == [
        ("a/1", {"n": 1}),
        ("b", "bee"),
    ]
    people = {d["id"]: d["data"] for d in admin.get("/docs/people")["items"]}
    assert people.pop("bob") == {"name": "bob", "age": 3}
    assert list(people.values()) == [{"name": "ann", "age": 4}]

    execution = admin.finished(execution_id)
    assert (execution["status"], execution["source_kind"]) == ("succeeded", "http")
    assert execution["logs"] == ["tour done 3"]


# -- trigger events -------------------------------------------------------------------

RECORD = (
    "def handle(e, ctx):\n"
    "    ctx.kv.set('seen/' + ctx.execution_id, {'event': e, 'depth': ctx.trigger_depth})\n"
)


def test_trigger_events_have_the_documented_shape(admin: Admin) -> None:
    """kv, docs and dead-letter events as API.md lists them, fired by admin writes."""
    admin.script("record", RECORD)
    admin.script("reject", "def handle(e, ctx):\n    ctx.reject('refused')\n")
    admin.post("/triggers/kv", {"script": "record", "key_glob": "data/*"})
    admin.post("/triggers/docs", {"script": "record", "collection_glob": "orders"})
    admin.post("/triggers/docs", {"script": "reject", "collection_glob": "bad"})
    admin.post("/triggers/dead-letter", {"script": "record", "source_kinds": ["docs"]})

    admin.ok("PUT", "/kv/data/1", {"a": 1}, expect=201)
    admin.ok("PUT", "/kv/data/1", 2)
    admin.ok("DELETE", "/kv/data/1", expect=204)
    order = admin.post("/docs/orders", {"t": 1})["id"]
    admin.ok("PUT", f"/docs/orders/{order}", {"t": 2})
    admin.ok("DELETE", f"/docs/orders/{order}", expect=204)
    admin.post("/docs/bad", {"x": 1})

    seen = wait_for(lambda: count(admin.get("/kv", prefix="seen/")["items"], 7), 30, "seven events")
    events = [e["value"]["event"] for e in seen]
    # Admin writes fire at depth 1, as a route script's writes do; the dead letter's
    # handler runs one deeper.
    depths = {(e["value"]["event"]["kind"], e["value"]["depth"]) for e in seen}
    assert depths == {("kv", 1), ("docs", 1), ("dead_letter", 2)}
    kv = [e for e in events if e["kind"] == "kv"]
    docs = [e for e in events if e["kind"] == "docs"]
    (dead,) = [e for e in events if e["kind"] == "dead_letter"]
    assert {frozenset(e) for e in kv} == {frozenset({"kind", "key", "op", "value", "prev_value"})}
    assert sorted((e["op"], repr(e["value"]), repr(e["prev_value"])) for e in kv) == sorted(
        [("set", "{'a': 1}", "None"), ("set", "2", "{'a': 1}"), ("delete", "None", "2")]
    )
    assert {e["key"] for e in kv} == {"data/1"}
    assert {frozenset(e) for e in docs} == {
        frozenset({"kind", "collection", "id", "op", "data", "prev_data"})
    }
    assert sorted((e["op"], repr(e["data"]), repr(e["prev_data"])) for e in docs) == sorted(
        [
            ("insert", "{'t': 1}", "None"),
            ("update", "{'t': 2}", "{'t': 1}"),
            ("delete", "None", "{'t': 2}"),
        ]
    )
    assert {(e["collection"], e["id"]) for e in docs} == {("orders", order)}
    assert set(dead) == {
        "kind",
        "dead_letter_id",
        "source_kind",
        "event",
        "error",
        "attempts",
    }
    (letter,) = admin.get("/dead-letters")["items"]
    assert dead["dead_letter_id"] == letter["id"]
    assert (dead["source_kind"], dead["attempts"]) == ("docs", 1)
    assert dead["error"]["kind"] == "rejected"
    assert dead["error"]["message"] == "refused"
    assert {k: dead["event"][k] for k in ("kind", "collection", "op", "data")} == {
        "kind": "docs",
        "collection": "bad",
        "op": "insert",
        "data": {"x": 1},
    }
