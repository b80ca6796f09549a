"""PATCH of a route and of a trigger: each field changed and seen in GET, the caller
becomes the registrant, validation as on create, 404 across apps, the node's route
cache, and what happens to executions already waiting in the outbox."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import sqlalchemy as sa

from manager_core import tables as t
from manager_core.postgres.outbox import PostgresOutboxRepo
from orchestrator_core.route_cache import CachedRouteTable
from picloud_shared.domain import DispatchMode
from picloud_shared.ids import AppId, RouteId, ScriptId, new_execution_id
from picloud_shared.outbox import NewOutboxRow, OutboxSourceKind
from picloud_shared.principals import Capability
from picloud_shared.retry import Backoff, RetryPolicy
from tests.manager.api.helpers import Api

pytestmark = pytest.mark.anyio

C = Capability
KINDS = {
    "kv": {"script": "s", "key_glob": "orders/*"},
    "docs": {"script": "s", "collection_glob": "orders"},
    "dead-letter": {"script": "s"},
}
RETRY = {
    "backoff": "linear",
    "base_delay_ms": 50,
    "max_delay_ms": 500,
    "max_attempts": 2,
    "jitter": 0.0,
}

DEFAULT_RETRY = RetryPolicy().to_wire()


def _url(api: Api, rest: str, app_id: str | None = None) -> str:
    return f"/apps/{app_id or api.app_id}{rest}"


async def _member(api: Api, name: str, *caps: Capability) -> tuple[str, str]:
    """A member of shop holding ``caps``: (user id, token)."""
    user_id, token = await api.user_id(name)
    body = {"capabilities": [str(c) for c in caps]}
    resp = await api.call("PUT", _url(api, f"/members/{user_id}"), api.root, body)
    assert resp.status_code == 200, resp.text
    return user_id, token


async def _trigger(api: Api, kind: str, **body: Any) -> dict[str, Any]:
    resp = await api.call("POST", _url(api, f"/triggers/{kind}"), api.root, {**KINDS[kind], **body})
    assert resp.status_code == 201, resp.text
    return dict(resp.json())


async def _get(api: Api, rest: str) -> dict[str, Any]:
    resp = await api.call("GET", _url(api, rest))
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


# -- routes ------------------------------------------------------------------------------


async def test_patch_route_changes_script_and_mode_and_the_registrant(api: Api) -> None:
    """Both fields change at once; the answer is the route as GET shows it; the caller
    (a member managing routes) becomes its registrant; method, path, id and
    created_at stay."""
    await api.script("s")
    other = await api.script("t")
    route = await api.route("GET", "/r/{id}", "s")
    user_id, token = await _member(api, "mgr", C.APP_MANAGE_ROUTES)
    body = {"script": "t", "dispatch_mode": "async"}
    resp = await api.call("PATCH", _url(api, f"/routes/{route['id']}"), token, body)
    assert resp.status_code == 200, resp.text
    patched = resp.json()
    assert patched == await _get(api, f"/routes/{route['id']}")
    assert patched == {
        **route,
        "script": "t",
        "script_id": other["id"],
        "dispatch_mode": "async",
        "registered_by": user_id,
    }


@pytest.mark.parametrize(
    ("body", "changed"),
    [
        ({"script": "t"}, {"script": "t"}),
        ({"dispatch_mode": "async"}, {"dispatch_mode": "async"}),
        ({}, {}),
        # method and path as they are (any case for the method) are accepted
        ({"method": "get", "path": "/r", "dispatch_mode": "sync"}, {}),
        # fields the API does not know are ignored, as everywhere
        ({"id": "x", "script_id": str(uuid.uuid4()), "nope": 1}, {}),
    ],
)
async def test_patch_route_changes_only_what_is_given(
    api: Api, body: dict[str, Any], changed: dict[str, Any]
) -> None:
    """Omitted fields keep their values; even an empty PATCH makes the caller the
    registrant (the way to take over a route whose registrant left)."""
    await api.script("s")
    other = await api.script("t")
    route = await api.route("GET", "/r", "s")
    owner_id = (await api.call("GET", "/users/me")).json()["id"]
    resp = await api.call("PATCH", _url(api, f"/routes/{route['id']}"), body=body)
    assert resp.status_code == 200, resp.text
    expected = {**route, **changed, "registered_by": owner_id}
    if "script" in changed:
        expected["script_id"] = other["id"]
    assert resp.json() == expected
    assert await _get(api, f"/routes/{route['id']}") == expected


@pytest.mark.parametrize(
    ("body", "code", "words"),
    [
        ({"method": "POST"}, "invalid_input", "'method'"),
        ({"path": "/other"}, "invalid_input", "'path'"),
        ({"path": "/R"}, "invalid_input", "'path'"),
        ({"script": "nope"}, "unknown_script", "nope"),
        ({"script": 3}, "invalid_input", "'script'"),
        ({"dispatch_mode": "later"}, "invalid_input", "dispatch_mode"),
        ({"method": ["GET"]}, "invalid_input", "'method' must be a string"),
    ],
)
async def test_patch_route_validation(
    api: Api, body: dict[str, Any], code: str, words: str
) -> None:
    """422 with create's codes; a method or path of another route says to create one;
    nothing changes (not even the registrant)."""
    await api.script("s")
    route = await api.route("GET", "/r", "s")
    resp = await api.call("PATCH", _url(api, f"/routes/{route['id']}"), body=body)
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["code"] == code
    assert words in error["message"]
    if words in ("'method'", "'path'"):
        assert "cannot change; create another route" in error["message"]
    assert await _get(api, f"/routes/{route['id']}") == route


async def test_patch_route_of_another_app_is_404(api: Api) -> None:
    """A route id of another app (or of nothing, or malformed) is 404; the other app's
    route is untouched."""
    other_app = await api.app("other")
    await api.script("s")
    await api.script("s", app_id=other_app)
    theirs = await api.route("GET", "/", "s", app_id=other_app)
    for route_id in (theirs["id"], str(uuid.uuid4()), "not-an-id"):
        resp = await api.call(
            "PATCH", _url(api, f"/routes/{route_id}"), body={"dispatch_mode": "async"}
        )
        assert resp.status_code == 404, resp.text
        assert resp.json()["error"]["code"] == "not_found"
    resp = await api.call("GET", _url(api, f"/routes/{theirs['id']}", other_app))
    assert resp.json() == theirs


async def test_the_nodes_route_cache_sees_a_patch_at_once(api: Api) -> None:
    """The orchestrator's route cache, wired to the repo as the binary wires it (and
    with a ttl no test outlives), serves the new script and mode on the next lookup."""
    await api.script("s")
    other = await api.script("t")
    route = await api.route("GET", "/r", "s")
    cache = CachedRouteTable(api.deps.routes, ttl=3600)
    api.deps.routes.changed.append(cache.invalidate)
    (before,) = await cache.routes_for_app("shop") or []
    assert before.dispatch_mode is DispatchMode.SYNC
    body = {"script": "t", "dispatch_mode": "async"}
    resp = await api.call("PATCH", _url(api, f"/routes/{route['id']}"), body=body)
    assert resp.status_code == 200, resp.text
    (after,) = await cache.routes_for_app("shop") or []
    assert str(after.script_id) == other["id"]
    assert after.dispatch_mode is DispatchMode.ASYNC
    assert (after.route_id, after.method, after.path) == (before.route_id, "GET", "/r")


async def test_a_failed_patch_leaves_the_cache_alone(api: Api) -> None:
    """Only a route that changed makes the cache forget."""
    await api.script("s")
    route = await api.route("GET", "/r", "s")
    forgotten: list[None] = []
    api.deps.routes.changed.append(lambda: forgotten.append(None))
    resp = await api.call("PATCH", _url(api, f"/routes/{route['id']}"), body={"script": "no"})
    assert resp.status_code == 422
    resp = await api.call("PATCH", _url(api, f"/routes/{uuid.uuid4()}"), body={})
    assert resp.status_code == 404
    assert forgotten == []


# -- triggers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "body", "changed"),
    [
        (
            "kv",
            {"script": "t", "key_glob": "invoices/*", "ops": ["delete"], "retry": RETRY},
            {"key_glob": "invoices/*", "ops": ["delete"], "retry": RETRY},
        ),
        (
            "docs",
            {"script": "t", "collection_glob": "inv*", "ops": ["update", "insert"]},
            {"collection_glob": "inv*", "ops": ["insert", "update"]},
        ),
        (
            "dead-letter",
            {"script": "t", "source_kinds": ["http", "kv", "kv"], "retry": None},
            {"source_kinds": ["http", "kv"]},
        ),
    ],
)
async def test_patch_trigger_changes_every_field_and_the_registrant(
    api: Api, kind: str, body: dict[str, Any], changed: dict[str, Any]
) -> None:
    """Every field of the kind changes; the answer is the trigger as GET shows it; the
    caller (holding app_manage_triggers and app_read_data) becomes its registrant."""
    await api.script("s")
    other = await api.script("t")
    trigger = await _trigger(api, kind)
    user_id, token = await _member(api, "mgr", C.APP_MANAGE_TRIGGERS, C.APP_READ_DATA)
    resp = await api.call("PATCH", _url(api, f"/triggers/{trigger['id']}"), token, body)
    assert resp.status_code == 200, resp.text
    expected = {
        **trigger,
        **changed,
        "script": "t",
        "script_id": other["id"],
        "registered_by": user_id,
    }
    assert resp.json() == expected
    assert await _get(api, f"/triggers/{trigger['id']}") == expected


@pytest.mark.parametrize(
    ("kind", "body", "changed"),
    [
        ("kv", {"key_glob": "x?"}, {"key_glob": "x?"}),
        ("kv", {"ops": ["set"]}, {"ops": ["set"]}),
        ("kv", {"ops": []}, {}),
        # created with RETRY: the omitted fields are the defaults, not RETRY's
        ("kv", {"retry": {"max_attempts": 9}}, {"retry": {**DEFAULT_RETRY, "max_attempts": 9}}),
        ("kv", {"script": "s", "kind": "kv", "key_glob": None}, {}),
        ("docs", {"collection_glob": "c"}, {"collection_glob": "c"}),
        ("docs", {"ops": ["delete"]}, {"ops": ["delete"]}),
        ("dead-letter", {"source_kinds": ["docs"]}, {"source_kinds": ["docs"]}),
        ("dead-letter", {"kind": "dead-letter"}, {}),
        ("dead-letter", {}, {}),
    ],
)
async def test_patch_trigger_changes_only_what_is_given(
    api: Api, kind: str, body: dict[str, Any], changed: dict[str, Any]
) -> None:
    """Omitted (or null) fields keep their values. A ``retry`` given replaces the policy
    whole, as on create: its omitted fields take the defaults."""
    await api.script("s")
    extra: dict[str, Any] = {"ops": []} if kind != "dead-letter" else {}
    if kind == "kv":
        extra["retry"] = RETRY
    trigger = await _trigger(api, kind, **extra)
    owner_id = (await api.call("GET", "/users/me")).json()["id"]
    resp = await api.call("PATCH", _url(api, f"/triggers/{trigger['id']}"), body=body)
    assert resp.status_code == 200, resp.text
    expected = {**trigger, **changed, "registered_by": owner_id}
    assert resp.json() == expected
    assert await _get(api, f"/triggers/{trigger['id']}") == expected


@pytest.mark.parametrize(
    ("kind", "body", "code"),
    [
        ("kv", {"key_glob": ""}, "invalid_glob"),
        ("kv", {"key_glob": "k" * 257}, "invalid_glob"),
        ("kv", {"key_glob": 5}, "invalid_input"),
        ("kv", {"ops": ["insert"]}, "unknown_op"),
        ("kv", {"ops": "set"}, "invalid_input"),
        ("kv", {"retry": {"max_attemps": 3}}, "invalid_retry_policy"),
        ("kv", {"retry": {"max_attempts": 0}}, "invalid_retry_policy"),
        ("kv", {"retry": 3}, "invalid_input"),
        ("kv", {"script": "nope"}, "unknown_script"),
        ("kv", {"collection_glob": "c"}, "invalid_input"),
        ("kv", {"source_kinds": ["kv"]}, "invalid_input"),
        ("kv", {"kind": "docs"}, "invalid_input"),
        ("docs", {"collection_glob": ""}, "invalid_glob"),
        ("docs", {"ops": ["set"]}, "unknown_op"),
        ("docs", {"key_glob": "k"}, "invalid_input"),
        ("docs", {"script": "nope", "ops": ["insert"]}, "unknown_script"),
        ("dead-letter", {"retry": {"max_attempts": 2}}, "invalid_retry_policy"),
        ("dead-letter", {"retry": {}}, "invalid_retry_policy"),
        ("dead-letter", {"source_kinds": ["dead_letter"]}, "invalid_input"),
        ("dead-letter", {"source_kinds": ["x"]}, "invalid_input"),
        ("dead-letter", {"ops": ["set"]}, "invalid_input"),
        ("dead-letter", {"key_glob": "k"}, "invalid_input"),
        ("dead-letter", {"script": "nope"}, "unknown_script"),
    ],
)
async def test_patch_trigger_validation(
    api: Api, kind: str, body: dict[str, Any], code: str
) -> None:
    """422 with create's codes (a dead-letter trigger's retry is invalid_retry_policy,
    as on create); a field of another kind, or another kind, is invalid_input; nothing
    changes (not even the registrant)."""
    await api.script("s")
    trigger = await _trigger(api, kind)
    resp = await api.call("PATCH", _url(api, f"/triggers/{trigger['id']}"), body=body)
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["code"] == code, resp.text
    assert await _get(api, f"/triggers/{trigger['id']}") == trigger


async def test_patch_trigger_of_another_app_is_404(api: Api) -> None:
    """A trigger id of another app (or of nothing, or malformed) is 404; the other
    app's trigger is untouched."""
    other_app = await api.app("other")
    await api.script("s", app_id=other_app)
    resp = await api.call("POST", _url(api, "/triggers/kv", other_app), api.root, KINDS["kv"])
    theirs = resp.json()
    await api.script("s")
    for trigger_id in (theirs["id"], str(uuid.uuid4()), "not-an-id"):
        url = _url(api, f"/triggers/{trigger_id}")
        resp = await api.call("PATCH", url, body={"key_glob": "x"})
        assert resp.status_code == 404, resp.text
        assert resp.json()["error"]["code"] == "not_found"
    resp = await api.call("GET", _url(api, f"/triggers/{theirs['id']}", other_app))
    assert resp.json() == theirs


async def _outbox(api: Api) -> list[Any]:
    async with api.deps.users._engine.connect() as conn:
        stmt = sa.select(t.outbox).order_by(t.outbox.c.id)
        return list((await conn.execute(stmt)).all())


async def test_a_patched_glob_matches_from_then_on(api: Api) -> None:
    """A kv trigger given a glob of another literal prefix fires for its keys and no
    longer for the old ones (the stored match prefix changes with it)."""
    await api.script("s")
    trigger = await _trigger(api, "kv", key_glob="orders/*")
    url = _url(api, f"/triggers/{trigger['id']}")
    assert (await api.call("PATCH", url, body={"key_glob": "inv/*/x"})).status_code == 200
    app = AppId(uuid.UUID(api.app_id))
    await api.deps.kv.set(app, "orders/1", 1)
    assert await _outbox(api) == []
    await api.deps.kv.set(app, "inv/1/x", 1)
    (row,) = await _outbox(api)
    assert row.payload["key"] == "inv/1/x"


async def test_waiting_rows_keep_the_script_and_policy_they_were_fired_with(api: Api) -> None:
    """An event fired before the PATCH keeps its script and retry policy (its outbox
    row's copies) when it is claimed; one fired after it has the new ones. Both run as
    the trigger's registrant when claimed: now the caller of the PATCH."""
    old = await api.script("s")
    new = await api.script("t")
    trigger = await _trigger(api, "kv", retry=RETRY)
    app = AppId(uuid.UUID(api.app_id))
    await api.deps.kv.set(app, "orders/1", 1)
    user_id, token = await _member(api, "mgr", C.APP_MANAGE_TRIGGERS, C.APP_READ_DATA)
    body = {"script": "t", "retry": {"max_attempts": 7}}
    resp = await api.call("PATCH", _url(api, f"/triggers/{trigger['id']}"), token, body)
    assert resp.status_code == 200, resp.text
    await api.deps.kv.set(app, "orders/2", 2)
    before, after = await _outbox(api)
    assert (before.payload["key"], after.payload["key"]) == ("orders/1", "orders/2")

    claimed = await PostgresOutboxRepo(api.deps.users._engine).claim_due("n", 10, 30)
    by_key = {c.row.payload["key"]: c for c in claimed}
    fired_before, fired_after = by_key["orders/1"], by_key["orders/2"]
    assert fired_before.script is not None
    assert fired_after.script is not None
    assert str(fired_before.script.id) == old["id"]
    assert fired_before.row.retry == RetryPolicy.from_wire(RETRY)
    assert str(fired_after.script.id) == new["id"]
    assert fired_after.row.retry == RetryPolicy(max_attempts=7)
    assert fired_before.owner_exists
    assert fired_after.owner_exists
    assert str(fired_before.principal_id) == str(fired_after.principal_id) == user_id


async def test_waiting_async_route_rows_keep_their_script(api: Api) -> None:
    """An async request accepted before a route's PATCH (a row as the orchestrator
    writes it) runs the script it was accepted for."""
    old = await api.script("s")
    await api.script("t")
    route = await api.route("POST", "/jobs", "s")
    resp = await api.call(
        "PATCH", _url(api, f"/routes/{route['id']}"), body={"dispatch_mode": "async"}
    )
    assert resp.status_code == 200
    outbox = PostgresOutboxRepo(api.deps.users._engine)
    await outbox.enqueue(
        NewOutboxRow(
            execution_id=new_execution_id(),
            app_id=AppId(uuid.UUID(api.app_id)),
            source_kind=OutboxSourceKind.HTTP,
            payload={"method": "POST", "path": "/jobs"},
            script_id=ScriptId(uuid.UUID(old["id"])),
            route_id=RouteId(uuid.UUID(route["id"])),
        )
    )
    resp = await api.call("PATCH", _url(api, f"/routes/{route['id']}"), body={"script": "t"})
    assert resp.status_code == 200
    (claimed,) = await outbox.claim_due("n", 10, 30)
    assert claimed.script is not None
    assert str(claimed.script.id) == old["id"]
    assert claimed.owner_exists


# -- scripts in use ------------------------------------------------------------------------


async def test_a_script_in_use_says_patch_and_patching_frees_it(api: Api) -> None:
    """The 409 for deleting a script in use names PATCH as the way out, and after its
    route and trigger are PATCHed to another script it can be deleted."""
    await api.script("s")
    await api.script("t")
    route = await api.route("GET", "/r", "s")
    trigger = await _trigger(api, "kv")
    resp = await api.call("DELETE", _url(api, "/scripts/s"))
    assert resp.status_code == 409
    assert "delete them, or PATCH them to another script, first" in resp.json()["error"]["message"]
    for rest in (f"/routes/{route['id']}", f"/triggers/{trigger['id']}"):
        resp = await api.call("PATCH", _url(api, rest), body={"script": "t"})
        assert resp.status_code == 200, resp.text
    assert (await api.call("DELETE", _url(api, "/scripts/s"))).status_code == 204


async def test_a_retry_policy_patch_shows_as_create_shows_it(api: Api) -> None:
    """The policy a PATCH stores reads back as the wire form (sanity for Backoff)."""
    await api.script("s")
    trigger = await _trigger(api, "kv")
    body = {"retry": {"backoff": "constant", "base_delay_ms": 7, "max_delay_ms": 7}}
    resp = await api.call("PATCH", _url(api, f"/triggers/{trigger['id']}"), body=body)
    assert resp.status_code == 200, resp.text
    policy = RetryPolicy.from_wire(resp.json()["retry"])
    assert (policy.backoff, policy.base_delay_ms) == (Backoff.CONSTANT, 7)
