"""Dead letters through the admin API: replayed is final, a replay that could never run
is refused, and an HTTP letter shows the route event."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa

from manager_core import tables as t
from picloud_shared.events import HttpEvent
from picloud_shared.ids import RouteId
from picloud_shared.outbox import HttpDispatchPayload
from tests.manager.api.endpoints import enqueue_execution, insert_dead_letter
from tests.manager.api.helpers import Api

pytestmark = pytest.mark.anyio

EVENT = HttpEvent("POST", "/orders/7", {"id": "7"}, {"q": "1"}, {"x-a": "b"}, '{"n": 1}', {"n": 1})


def _url(api: Api, rest: str = "") -> str:
    return f"/apps/{api.app_id}/dead-letters{rest}"


async def _count(api: Api, table: sa.Table) -> int:
    async with api.deps.users._engine.connect() as conn:
        return int(await conn.scalar(sa.select(sa.func.count()).select_from(table)) or 0)


async def _resolution(api: Api, dl_id: uuid.UUID) -> str | None:
    items = (await api.call("GET", _url(api))).json()["items"]
    (letter,) = [i for i in items if i["id"] == str(dl_id)]
    return letter["resolution"]  # type: ignore[no-any-return]


def _conflict(resp: object, message: str) -> None:
    assert resp.status_code == 409, resp.text  # type: ignore[attr-defined]
    assert resp.json() == {"error": {"code": "conflict", "message": message}}  # type: ignore[attr-defined]


async def _http_letter(api: Api) -> tuple[uuid.UUID, str]:
    """A dead letter of an async request to ``POST /orders/{id}``; (its id, the route's)."""
    script = await api.script("orders")
    route = await api.route("POST", "/orders/{id}", "orders")
    payload = HttpDispatchPayload(RouteId(uuid.UUID(route["id"])), EVENT.to_wire()).to_wire()
    dl_id = await insert_dead_letter(
        api,
        await enqueue_execution(api),
        source_kind="http",
        payload=payload,
        trigger_id=None,
        route_id=route["id"],
        script_id=script["id"],
    )
    return dl_id, route["id"]


async def test_a_dead_letter_is_read_by_id_and_its_replay_says_where_to_look(api: Api) -> None:
    """GET /dead-letters/{dl_id} answers the letter as listed (404 for another id); a
    replay's 202 has a Location, as an async route's has: the new execution."""
    dl_id, _ = await _http_letter(api)
    (listed,) = (await api.call("GET", _url(api))).json()["items"]
    assert (await api.call("GET", _url(api, f"/{dl_id}"))).json() == listed
    missing = await api.call("GET", _url(api, f"/{uuid.uuid4()}"))
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "not_found")
    replayed = await api.call("POST", _url(api, f"/{dl_id}/replay"))
    assert replayed.status_code == 202
    execution_id = replayed.json()["execution_id"]
    location = replayed.headers["location"]
    assert location == f"/api/v1/admin/apps/{api.app_id}/executions/{execution_id}"
    got = await api.client.get(
        location.removeprefix("/api/v1/admin"), headers={"Authorization": f"Bearer {api.owner}"}
    )
    assert got.json()["id"] == execution_id


async def test_a_replayed_dead_letter_cannot_be_resolved(api: Api) -> None:
    """replay → 202; resolve → 409 (it stays ``replayed``); replay again → still 409."""
    dl_id = await insert_dead_letter(api, await enqueue_execution(api))
    assert (await api.call("POST", _url(api, f"/{dl_id}/replay"))).status_code == 202
    resolve = await api.call("POST", _url(api, f"/{dl_id}/resolve"))
    _conflict(resolve, "this dead letter was already replayed")
    assert await _resolution(api, dl_id) == "replayed"
    again = await api.call("POST", _url(api, f"/{dl_id}/replay"))
    _conflict(again, "this dead letter was already replayed")
    assert await _count(api, t.outbox) == 2  # the original row and the one replay


async def test_replaying_a_dead_letter_whose_trigger_is_gone_is_409(api: Api) -> None:
    """Its trigger deleted: 409 naming the trigger, and nothing is written."""
    dl_id = await insert_dead_letter(api, await enqueue_execution(api))
    async with api.deps.users._engine.connect() as conn:
        (trigger_id,) = (
            await conn.execute(
                sa.select(t.dead_letters.c.trigger_id).where(t.dead_letters.c.id == dl_id)
            )
        ).one()
    deleted = await api.call("DELETE", f"/apps/{api.app_id}/triggers/{trigger_id}")
    assert deleted.status_code == 204
    before = (await _count(api, t.outbox), await _count(api, t.executions))
    _conflict(await api.call("POST", _url(api, f"/{dl_id}/replay")), "the trigger no longer exists")
    assert (await _count(api, t.outbox), await _count(api, t.executions)) == before
    assert await _resolution(api, dl_id) is None


async def test_replaying_a_dead_letter_whose_route_is_gone_is_409(api: Api) -> None:
    """An async request's route deleted: 409 naming the route, and nothing is written."""
    dl_id, route_id = await _http_letter(api)
    deleted = await api.call("DELETE", f"/apps/{api.app_id}/routes/{route_id}")
    assert deleted.status_code == 204
    before = (await _count(api, t.outbox), await _count(api, t.executions))
    _conflict(await api.call("POST", _url(api, f"/{dl_id}/replay")), "the route no longer exists")
    assert (await _count(api, t.outbox), await _count(api, t.executions)) == before
    assert await _resolution(api, dl_id) is None


async def test_an_http_dead_letters_payload_is_the_route_event(api: Api) -> None:
    """The listing shows an HTTP letter's payload as the route event its script got."""
    dl_id, _ = await _http_letter(api)
    (letter,) = (await api.call("GET", _url(api))).json()["items"]
    assert (letter["id"], letter["source_kind"]) == (str(dl_id), "http")
    assert letter["payload"] == EVENT.to_script()
    assert (await api.call("POST", _url(api, f"/{dl_id}/replay"))).status_code == 202


async def test_the_list_filters_by_resolution_and_source_kind(api: Api) -> None:
    """``?resolution=`` (``unresolved``: none yet) and ``?source_kind=`` narrow the
    list, also together; a value outside them is 422 naming the allowed ones."""
    kv_open = await insert_dead_letter(api, await enqueue_execution(api))
    kv_done = await insert_dead_letter(api, await enqueue_execution(api))
    assert (await api.call("POST", _url(api, f"/{kv_done}/resolve"))).status_code in (200, 204)
    http_open, _ = await _http_letter(api)

    async def ids(query: str) -> set[str]:
        resp = await api.call("GET", _url(api, query))
        assert resp.status_code == 200, resp.text
        return {item["id"] for item in resp.json()["items"]}

    assert await ids("") == {str(kv_open), str(kv_done), str(http_open)}
    assert await ids("?resolution=unresolved") == {str(kv_open), str(http_open)}
    assert await ids("?resolution=resolved") == {str(kv_done)}
    assert await ids("?resolution=handled") == set()
    assert await ids("?source_kind=http") == {str(http_open)}
    assert await ids("?source_kind=kv&resolution=unresolved") == {str(kv_open)}
    for bad in ("?resolution=open", "?source_kind=cron"):
        resp = await api.call("GET", _url(api, bad))
        assert resp.status_code == 422, resp.text
        assert resp.json()["error"]["code"] == "invalid_input"
        assert "must be one of:" in resp.json()["error"]["message"]
