"""Triggers (the seed's three tests per kind), KV, docs, executions, dead letters."""

from __future__ import annotations

import json
import uuid
from urllib.parse import quote

import pytest
import sqlalchemy as sa

from manager_core import tables as t
from manager_core.api._pagination import ANOTHER_LISTS_CURSOR, encode_cursor
from picloud_shared.ids import AppId
from picloud_shared.principals import ALL_CAPABILITIES, Capability
from tests.manager.api.endpoints import enqueue_execution, insert_dead_letter
from tests.manager.api.helpers import Api, cursor_list

pytestmark = pytest.mark.anyio

KINDS = {
    "kv": {"script": "s", "key_glob": "orders/*"},
    "docs": {"script": "s", "collection_glob": "orders"},
    "dead-letter": {"script": "s"},
}


def _url(api: Api, rest: str) -> str:
    return f"/apps/{api.app_id}{rest}"


async def _outbox_rows(api: Api) -> int:
    async with api.deps.users._engine.connect() as conn:
        return int(await conn.scalar(sa.select(sa.func.count()).select_from(t.outbox)) or 0)


# -- triggers -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_create_trigger_happy_path(api: Api, kind: str) -> None:
    """201 with the kind, its script (name and id, as a route has), details and default
    retry; listed afterwards, the same."""
    script = await api.script("s")
    resp = await api.call("POST", _url(api, f"/triggers/{kind}"), body=KINDS[kind])
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["kind"] == kind.replace("-", "_")
    assert (body["script"], body["script_id"]) == ("s", script["id"])
    default_retry = {
        "backoff": "exponential",
        "base_delay_ms": 1000,
        "max_delay_ms": 300000,
        "max_attempts": 5,
        "jitter": 0.2,
    }
    # A dead-letter handler is never retried: no policy.
    assert body["retry"] == (None if kind == "dead-letter" else default_retry)
    listed = (await api.call("GET", _url(api, "/triggers"))).json()
    assert listed == {"items": [body], "next_cursor": None}


@pytest.mark.parametrize(("kind", "glob"), [("kv", "key_glob"), ("docs", "collection_glob")])
async def test_create_trigger_rejects_an_empty_glob(api: Api, kind: str, glob: str) -> None:
    """An empty glob answers 422 invalid_glob."""
    await api.script("s")
    resp = await api.call("POST", _url(api, f"/triggers/{kind}"), body={**KINDS[kind], glob: ""})
    assert resp.status_code == 422
    assert resp.json()["error"]["code"] == "invalid_glob"


@pytest.mark.parametrize("kinds", [["x"], ["kv", "dead_letter"]])
async def test_create_dead_letter_trigger_rejects_an_unknown_source_kind(
    api: Api, kinds: list[str]
) -> None:
    """Dead-letter triggers have no glob; an unknown source kind is their 422, and so
    is ``dead_letter``: a handler's execution is never dead-lettered, so it would
    match nothing."""
    await api.script("s")
    resp = await api.call(
        "POST", _url(api, "/triggers/dead-letter"), body={"script": "s", "source_kinds": kinds}
    )
    assert resp.status_code == 422
    assert "expected one of: kv, docs, http" in resp.json()["error"]["message"]


async def test_a_dead_letter_trigger_takes_no_retry_policy(api: Api) -> None:
    """A retry policy on a dead-letter trigger would never be used (handlers are never
    retried): 422 ``invalid_retry_policy`` rather than silently unused."""
    await api.script("s")
    resp = await api.call(
        "POST",
        _url(api, "/triggers/dead-letter"),
        body={"script": "s", "retry": {"max_attempts": 10}},
    )
    assert (resp.status_code, resp.json()["error"]["code"]) == (422, "invalid_retry_policy")
    assert (await api.call("GET", _url(api, "/triggers"))).json()["items"] == []


@pytest.mark.parametrize("kind", KINDS)
async def test_create_trigger_needs_app_manage_triggers(api: Api, kind: str) -> None:
    """A member without app_manage_triggers is refused: 403."""
    await api.script("s")
    token = await api.user("m", *(ALL_CAPABILITIES - {Capability.APP_MANAGE_TRIGGERS}))
    resp = await api.call("POST", _url(api, f"/triggers/{kind}"), token, KINDS[kind])
    assert resp.status_code == 403


@pytest.mark.parametrize(
    ("kind", "extra"),
    [
        ("kv", {"ops": ["insert"]}),
        ("docs", {"ops": ["set"]}),
        ("kv", {"ops": "set"}),
        ("kv", {"retry": {"max_attempts": 0}}),
        ("kv", {"retry": {"backof": "linear"}}),
        ("kv", {"retry": 5}),
        ("kv", {"script": "missing"}),
        ("kv", {"key_glob": "x" * 257}),
    ],
)
async def test_malformed_trigger_bodies_are_422(api: Api, kind: str, extra: dict) -> None:
    """Unknown ops, bad retry policies, unknown scripts and long globs answer 422."""
    await api.script("s")
    resp = await api.call("POST", _url(api, f"/triggers/{kind}"), body={**KINDS[kind], **extra})
    assert resp.status_code == 422, resp.text


async def test_delete_trigger_then_the_script_can_go(api: Api) -> None:
    """DELETE answers 204 (then 404), and frees the script for deletion."""
    await api.script("s")
    trigger = (await api.call("POST", _url(api, "/triggers/kv"), body=KINDS["kv"])).json()
    assert (await api.call("DELETE", _url(api, f"/triggers/{trigger['id']}"))).status_code == 204
    assert (await api.call("DELETE", _url(api, f"/triggers/{trigger['id']}"))).status_code == 404
    assert (await api.call("DELETE", _url(api, "/scripts/s"))).status_code == 204


async def test_a_trigger_is_read_by_id_as_listed(api: Api) -> None:
    """GET /triggers/{trigger_id} answers the trigger as the list and the create do;
    another id is 404."""
    await api.script("s")
    created = (await api.call("POST", _url(api, "/triggers/kv"), body=KINDS["kv"])).json()
    got = await api.call("GET", _url(api, f"/triggers/{created['id']}"))
    assert got.json() == created
    assert (await api.call("GET", _url(api, "/triggers"))).json()["items"] == [created]
    missing = await api.call("GET", _url(api, f"/triggers/{uuid.uuid4()}"))
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "not_found")


# -- KV and docs ----------------------------------------------------------------------


async def test_kv_round_trip_with_slashes_in_the_key(api: Api) -> None:
    """PUT then GET a key holding '/'; versions count writes; DELETE then 404. A PUT
    that creates the key is 201, one that replaces it 200 (as for documents)."""
    url = _url(api, "/kv/users/42")
    created = await api.call("PUT", url, body={"n": 1})
    assert created.status_code == 201
    assert created.json() == {"key": "users/42", "value": {"n": 1}, "version": 1}
    assert (await api.call("PUT", url, body=[1, 2])).status_code == 200
    assert (await api.call("GET", url)).json()["version"] == 2
    listed = await api.client.get(_url(api, "/kv"), params={"prefix": "users/"}, headers=_h(api))
    assert [i["key"] for i in listed.json()["items"]] == ["users/42"]
    assert (await api.call("DELETE", url)).status_code == 204
    assert (await api.call("GET", url)).status_code == 404
    assert (await api.call("PUT", url, body=3)).status_code == 201  # created again


async def test_keys_and_ids_with_a_line_break_are_reachable(api: Api) -> None:
    """A key or document id holding a newline (a script may write one) is read,
    written and deleted through its escaped path (``%0A``) like any other."""
    url = _url(api, "/kv/line%0Abreak")
    assert (await api.call("PUT", url, body=1)).json()["key"] == "line\nbreak"
    assert (await api.call("GET", url)).json()["value"] == 1
    assert (await api.call("DELETE", url)).status_code == 204
    doc = _url(api, "/docs/c/a%0Ab")
    assert (await api.call("PUT", doc, body={"n": 1})).is_success
    assert (await api.call("GET", doc)).json()["id"] == "a\nb"
    assert (await api.call("DELETE", doc)).status_code == 204
    unknown = await api.client.get("/no%0Asuch")  # below the prefix: still the admin API
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (401, "unauthenticated")


@pytest.mark.parametrize("escape", ["%ff", "%fe", "%80", "%ED%A0%80"])
async def test_an_escape_that_is_no_utf8_names_no_key_nor_document(api: Api, escape: str) -> None:
    """``kv/%ff`` and ``kv/%fe`` would both decode to U+FFFD, one key: each is 422
    (for KV, documents and a list's prefix) and nothing is written; a U+FFFD the path
    spells (``%EF%BF%BD``) is a key like any other."""
    tried = [
        ("PUT", f"/kv/{escape}"),
        ("GET", f"/kv/{escape}"),
        ("PUT", f"/docs/c/{escape}"),
        ("DELETE", f"/docs/c/a{escape}"),
    ]
    for method, rest in tried:
        r = await api.call(method, _url(api, rest), body={"n": 1} if method == "PUT" else None)
        assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_input"), rest
    listed = await api.call("GET", _url(api, f"/kv?prefix={escape}"))
    assert (listed.status_code, listed.json()["error"]["code"]) == (422, "invalid_input")
    assert (await api.call("GET", _url(api, "/kv"))).json()["items"] == []
    spelled = _url(api, "/kv/%EF%BF%BD")
    assert (await api.call("PUT", spelled, body=1)).json()["key"] == "\ufffd"
    assert (await api.call("GET", _url(api, "/kv?prefix=%EF%BF%BD"))).json()["items"][0][
        "key"
    ] == "\ufffd"


async def test_a_kv_prefix_is_bounded_as_a_key_is(api: Api) -> None:
    """A prefix of 512 bytes (a key's most) lists; one of 513 is 422 ``limit_exceeded``,
    as ``ctx.kv.list`` raises, not an empty page."""
    key = "é" * 256  # 512 bytes
    assert (await api.call("PUT", _url(api, f"/kv/{key}"), body=1)).status_code == 201
    listed = await api.call("GET", _url(api, f"/kv?prefix={key}"))
    assert [item["key"] for item in listed.json()["items"]] == [key]
    over = await api.call("GET", _url(api, f"/kv?prefix={key}x"))
    assert (over.status_code, over.json()["error"]["code"]) == (422, "limit_exceeded")


async def test_admin_kv_writes_fire_kv_triggers(api: Api) -> None:
    """A PUT through the admin API writes one outbox row per matching trigger."""
    await api.script("s")
    await api.call("POST", _url(api, "/triggers/kv"), body=KINDS["kv"])
    await api.call("PUT", _url(api, "/kv/orders/1"), body=1)
    await api.call("PUT", _url(api, "/kv/other"), body=1)
    assert await _outbox_rows(api) == 1


async def test_admin_writes_fire_at_the_depth_a_route_scripts_writes_do(api: Api) -> None:
    """Every admin write (KV put and delete, document post, put, replace and delete)
    fires its trigger at trigger_depth 1, as a write by a depth-0 script does, so a
    self-triggering script runs as often after either."""
    await api.script("s")
    await api.call("POST", _url(api, "/triggers/kv"), body=KINDS["kv"])
    await api.call("POST", _url(api, "/triggers/docs"), body=KINDS["docs"])
    await api.call("PUT", _url(api, "/kv/orders/1"), body=1)
    await api.call("DELETE", _url(api, "/kv/orders/1"))
    posted = (await api.call("POST", _url(api, "/docs/orders"), body={"n": 1})).json()
    await api.call("PUT", _url(api, "/docs/orders/x"), body={"n": 1})
    await api.call("PUT", _url(api, "/docs/orders/x"), body={"n": 2})
    await api.call("DELETE", _url(api, f"/docs/orders/{posted['id']}"))
    async with api.deps.users._engine.connect() as conn:
        depths = (await conn.scalars(sa.select(t.outbox.c.trigger_depth))).all()
    assert depths == [1] * 6


async def test_kv_value_over_256_kib_is_413(api: Api) -> None:
    """The KV value limit answers 413."""
    resp = await api.call("PUT", _url(api, "/kv/big"), body="x" * (256 * 1024))
    assert resp.status_code == 413


async def test_docs_insert_put_get_delete(api: Api) -> None:
    """POST 201 with a generated id; PUT replaces (200) or creates (201); DELETE 204."""
    created = await api.call("POST", _url(api, "/docs/things"), body={"a": 1})
    assert created.status_code == 201
    doc_id = created.json()["id"]
    put = await api.call("PUT", _url(api, f"/docs/things/{doc_id}"), body={"a": 2})
    assert (put.status_code, put.json()) == (200, {"id": doc_id, "data": {"a": 2}})
    fresh = await api.call("PUT", _url(api, "/docs/things/mine"), body={"b": 1})
    assert fresh.status_code == 201
    items = (await api.call("GET", _url(api, "/docs/things"))).json()["items"]
    assert sorted(i["id"] for i in items) == sorted([doc_id, "mine"])
    assert (await api.call("DELETE", _url(api, "/docs/things/mine"))).status_code == 204
    assert (await api.call("GET", _url(api, "/docs/things/mine"))).status_code == 404


@pytest.mark.parametrize("doc_id", ["a/b", "a/b/c", "a/", "/a", "a//b", "%2F", "a?b#c%"])
@pytest.mark.parametrize("encoded", [False, True], ids=["raw", "encoded"])
async def test_a_document_id_holding_slashes_is_addressable(
    api: Api, doc_id: str, encoded: bool
) -> None:
    """A document a script inserted under an id holding '/' (``ctx.docs.insert('c',
    …, id='a/b')``) is read, replaced and deleted at ``/docs/c/a/b`` and at
    ``/docs/c/a%2Fb`` alike; PUT creates one under such an id."""
    await api.deps.documents.insert(AppId(uuid.UUID(api.app_id)), "c", {"v": 1}, doc_id)
    # '/' as is (raw) or as %2F (encoded); what a URL cannot hold as is, always encoded
    path = quote(doc_id, safe="" if encoded else "/")
    url = _url(api, f"/docs/c/{path}")
    got = await api.call("GET", url)
    assert (got.status_code, got.json()) == (200, {"id": doc_id, "data": {"v": 1}})
    put = await api.call("PUT", url, body={"v": 2})
    assert (put.status_code, put.json()) == (200, {"id": doc_id, "data": {"v": 2}})
    assert (await api.call("DELETE", url)).status_code == 204
    gone = await api.call("GET", url)
    assert gone.status_code == 404
    assert gone.json()["error"]["message"].startswith("no document")
    assert (await api.call("PUT", url, body={"v": 3})).status_code == 201
    items = (await api.call("GET", _url(api, "/docs/c"))).json()["items"]
    assert items == [{"id": doc_id, "data": {"v": 3}}]


@pytest.mark.parametrize("doc_id", ["..", ".", "a/../b", "a/./b"])
async def test_a_document_id_holding_dot_segments_is_addressable_encoded(
    api: Api, doc_id: str
) -> None:
    """An id that is or holds '.' or '..' between slashes is addressable with its dots
    sent as %2E (a client resolves raw dot segments away before sending)."""
    await api.deps.documents.insert(AppId(uuid.UUID(api.app_id)), "c", {"v": 1}, doc_id)
    url = _url(api, "/docs/c/" + quote(doc_id, safe="/").replace(".", "%2E"))
    got = await api.call("GET", url)
    assert (got.status_code, got.json()) == (200, {"id": doc_id, "data": {"v": 1}})
    assert (await api.call("DELETE", url)).status_code == 204


@pytest.mark.parametrize("body", [[1], "text", None])
async def test_documents_must_be_objects(api: Api, body: object) -> None:
    """A document body that is not a JSON object answers 422."""
    resp = await api.client.post(
        _url(api, "/docs/things"),
        content=b"null" if body is None else json.dumps(body).encode(),
        headers=_h(api),
    )
    assert resp.status_code == 422


async def test_invalid_collection_is_422(api: Api) -> None:
    """Collection names follow [A-Za-z0-9_-]{1,63}."""
    resp = await api.call("POST", _url(api, "/docs/bad.name"), body={"a": 1})
    assert resp.status_code == 422


# -- executions and dead letters ------------------------------------------------------


async def test_an_enqueued_execution_is_readable(api: Api) -> None:
    """GET answers the execution's wire form; list filters by status and kind."""
    execution_id = await enqueue_execution(api)
    one = (await api.call("GET", _url(api, f"/executions/{execution_id}"))).json()
    assert (one["id"], one["status"], one["source_kind"]) == (str(execution_id), "queued", "http")
    queued = await api.client.get(
        _url(api, "/executions"), params={"status": "queued"}, headers=_h(api)
    )
    failed = await api.client.get(
        _url(api, "/executions"), params={"status": "failed"}, headers=_h(api)
    )
    assert [i["id"] for i in queued.json()["items"]] == [str(execution_id)]
    assert failed.json()["items"] == []


@pytest.mark.parametrize("params", [{"status": "done"}, {"source_kind": "cron"}, {"cursor": "e30"}])
async def test_bad_execution_filters_are_422(api: Api, params: dict) -> None:
    """Unknown status or source kind filters, and foreign cursors, answer 422."""
    resp = await api.client.get(_url(api, "/executions"), params=params, headers=_h(api))
    assert resp.status_code == 422


async def test_executions_page_on_past_an_item_deleted_meanwhile(api: Api) -> None:
    """The cursor holds the last item's (created_at, id), not only its id: when that
    item is deleted between two pages (retention), the next page still follows it
    instead of coming back empty; a cursor that is not one is 422."""
    ids = [str(await enqueue_execution(api)) for _ in range(5)]
    url = _url(api, "/executions")
    first = (await api.client.get(url, params={"limit": 2}, headers=_h(api))).json()
    assert len(first["items"]) == 2
    last = first["items"][-1]["id"]
    async with api.deps.users._engine.begin() as conn:
        await conn.execute(sa.delete(t.executions).where(t.executions.c.id == uuid.UUID(last)))
    params = {"limit": 10, "cursor": first["next_cursor"]}
    rest = (await api.client.get(url, params=params, headers=_h(api))).json()
    assert [i["id"] for i in rest["items"]] == [
        i for i in reversed(ids) if i not in (first["items"][0]["id"], last)
    ]
    assert rest["next_cursor"] is None
    list_id = cursor_list(first["next_cursor"])  # this list's: only the key is bad
    for key in (("yesterday", last), ("2026-01-01T00:00:00", last)):
        bad = encode_cursor(key, list_id)
        resp = await api.client.get(url, params={"cursor": bad}, headers=_h(api))
        assert resp.status_code == 422, resp.text
        assert resp.json()["error"]["message"] != ANOTHER_LISTS_CURSOR


async def test_another_apps_execution_is_404(api: Api) -> None:
    """Execution ids are scoped to their app."""
    other = await api.app("blog")
    execution_id = await enqueue_execution(api, other)
    assert (await api.call("GET", _url(api, f"/executions/{execution_id}"))).status_code == 404
    assert (await api.call("GET", _url(api, f"/executions/{uuid.uuid4()}"))).status_code == 404


async def test_replay_a_dead_letter_once(api: Api) -> None:
    """Replay answers 202 with a readable execution; a second replay is 409."""
    dl_id = await insert_dead_letter(api, await enqueue_execution(api))
    resp = await api.call("POST", _url(api, f"/dead-letters/{dl_id}/replay"))
    assert resp.status_code == 202
    execution_id = resp.json()["execution_id"]
    assert (await api.call("GET", _url(api, f"/executions/{execution_id}"))).status_code == 200
    again = await api.call("POST", _url(api, f"/dead-letters/{dl_id}/replay"))
    assert again.status_code == 409


async def test_resolve_a_dead_letter(api: Api) -> None:
    """Resolve marks it ``resolved``; the listing shows that; unknown ids are 404."""
    dl_id = await insert_dead_letter(api, await enqueue_execution(api))
    resp = await api.call("POST", _url(api, f"/dead-letters/{dl_id}/resolve"))
    assert (resp.status_code, resp.json()["resolution"]) == (200, "resolved")
    listed = (await api.call("GET", _url(api, "/dead-letters"))).json()["items"]
    assert [(i["id"], i["resolution"]) for i in listed] == [(str(dl_id), "resolved")]
    missing = await api.call("POST", _url(api, f"/dead-letters/{uuid.uuid4()}/resolve"))
    assert missing.status_code == 404


def _h(api: Api) -> dict[str, str]:
    return {"Authorization": f"Bearer {api.owner}"}
