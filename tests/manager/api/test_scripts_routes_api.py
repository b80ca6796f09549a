"""The script and route endpoints: shapes, limits at their edges, conflicts, isolation."""

from __future__ import annotations

import uuid

import anyio
import pytest

from picloud_shared.limits import MAX_SCRIPT_SOURCE_BYTES
from picloud_shared.principals import Capability
from tests.manager.api.helpers import SOURCE, Api

pytestmark = pytest.mark.anyio


def _scripts(api: Api, app_id: str | None = None) -> str:
    return f"/apps/{app_id or api.app_id}/scripts"


def _routes(api: Api, app_id: str | None = None) -> str:
    return f"/apps/{app_id or api.app_id}/routes"


# -- scripts --------------------------------------------------------------------------


async def test_create_script_answers_201_with_version_1(api: Api) -> None:
    """201 ``{"id", "name", "version"}`` plus the limits in force."""
    resp = await api.call("POST", _scripts(api), body={"name": "hello", "source": SOURCE})
    assert resp.status_code == 201
    body = resp.json()
    assert {k: body[k] for k in ("name", "version", "timeout_seconds", "memory_limit_mb")} == {
        "name": "hello",
        "version": 1,
        "timeout_seconds": 10,
        "memory_limit_mb": 128,
    }
    assert "id" in body


async def test_get_script_includes_its_source(api: Api) -> None:
    """GET one script answers its source; the listing does not."""
    created = await api.script("hello")
    one = (await api.call("GET", f"{_scripts(api)}/hello")).json()
    listed = (await api.call("GET", _scripts(api))).json()
    assert one == {**created, "source": SOURCE}
    assert listed == {"items": [created], "next_cursor": None}


async def test_put_script_bumps_version_and_keeps_other_fields(api: Api) -> None:
    """PUT replaces the given fields, keeps the rest and bumps ``version``."""
    await api.script("hello", timeout_seconds=30)
    resp = await api.call("PUT", f"{_scripts(api)}/hello", body={"source": "x = 1"})
    assert resp.status_code == 200
    assert (resp.json()["version"], resp.json()["timeout_seconds"]) == (2, 30)
    resp = await api.call("PUT", f"{_scripts(api)}/hello", body={"memory_limit_mb": 64})
    got = (await api.call("GET", f"{_scripts(api)}/hello")).json()
    assert (got["version"], got["source"], got["memory_limit_mb"]) == (3, "x = 1", 64)


async def test_put_a_missing_script_is_404(api: Api) -> None:
    """PUT updates; it does not create."""
    resp = await api.call("PUT", f"{_scripts(api)}/nope", body={"source": "x"})
    assert resp.status_code == 404


async def test_delete_script_then_it_is_gone(api: Api) -> None:
    """DELETE answers 204, then GET and DELETE answer 404."""
    await api.script("hello")
    assert (await api.call("DELETE", f"{_scripts(api)}/hello")).status_code == 204
    assert (await api.call("GET", f"{_scripts(api)}/hello")).status_code == 404
    assert (await api.call("DELETE", f"{_scripts(api)}/hello")).status_code == 404


async def test_delete_a_script_used_by_a_route_is_409(api: Api) -> None:
    """A script in use cannot be deleted."""
    await api.script("s")
    await api.route("GET", "/", "s")
    resp = await api.call("DELETE", f"{_scripts(api)}/s")
    assert resp.status_code == 409


async def test_duplicate_script_name_is_409(api: Api) -> None:
    """Script names are unique in an app."""
    await api.script("hello")
    resp = await api.call("POST", _scripts(api), body={"name": "hello", "source": SOURCE})
    assert resp.status_code == 409


async def test_source_of_exactly_256_kib_is_accepted(api: Api) -> None:
    """The source limit is inclusive."""
    source = "#" * MAX_SCRIPT_SOURCE_BYTES
    resp = await api.call("POST", _scripts(api), body={"name": "big", "source": source})
    assert resp.status_code == 201


async def test_source_one_byte_over_256_kib_is_413(api: Api) -> None:
    """One byte more is PayloadTooLarge, on create and on update."""
    await api.script("hello")
    source = "#" * (MAX_SCRIPT_SOURCE_BYTES + 1)
    resp = await api.call("POST", _scripts(api), body={"name": "big", "source": source})
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "payload_too_large"
    resp = await api.call("PUT", f"{_scripts(api)}/hello", body={"source": source})
    assert resp.status_code == 413


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("timeout_seconds", 1),
        ("timeout_seconds", 300),
        ("memory_limit_mb", 16),
        ("memory_limit_mb", 2048),
    ],
)
async def test_limits_at_their_edges_are_accepted(api: Api, field: str, value: int) -> None:
    """timeout 1-300 and memory 16-2048 are inclusive."""
    resp = await api.call("POST", _scripts(api), body={"name": "s", "source": SOURCE, field: value})
    assert resp.status_code == 201
    assert resp.json()[field] == value


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("timeout_seconds", 0),
        ("timeout_seconds", 301),
        ("memory_limit_mb", 15),
        ("memory_limit_mb", 2049),
    ],
)
async def test_limits_past_their_edges_are_422(api: Api, field: str, value: int) -> None:
    """One past either edge is limit_exceeded, on create and on update."""
    resp = await api.call("POST", _scripts(api), body={"name": "s", "source": SOURCE, field: value})
    assert resp.status_code == 422
    assert resp.json()["error"]["code"] == "limit_exceeded"
    await api.script("t")
    resp = await api.call("PUT", f"{_scripts(api)}/t", body={field: value})
    assert resp.status_code == 422


@pytest.mark.parametrize(
    "body",
    [
        {"source": SOURCE},
        {"name": "s"},
        {"name": "bad name", "source": SOURCE},
        {"name": "s", "source": 1},
        {"name": "s", "source": SOURCE, "timeout_seconds": "10"},
        {"name": "s", "source": SOURCE, "timeout_seconds": 10.5},
        {"name": "s", "source": SOURCE, "memory_limit_mb": True},
    ],
)
async def test_malformed_script_bodies_are_422(api: Api, body: dict) -> None:
    """Missing, invalid or mistyped fields answer 422."""
    resp = await api.call("POST", _scripts(api), body=body)
    assert resp.status_code == 422, resp.text


async def test_another_apps_script_is_not_visible(api: Api) -> None:
    """A member of two apps cannot reach one app's script through the other."""
    other = await api.app("blog")
    await api.script("secret", app_id=other)
    for method in ("GET", "DELETE"):
        assert (await api.call(method, f"{_scripts(api)}/secret")).status_code == 404
    resp = await api.call("PUT", f"{_scripts(api)}/secret", body={"source": "x"})
    assert resp.status_code == 404
    assert (await api.call("GET", _scripts(api))).json()["items"] == []


async def test_a_malformed_script_name_in_the_path_is_404(api: Api) -> None:
    """A name that cannot exist answers 404, not 422."""
    resp = await api.call("GET", f"{_scripts(api)}/bad%20name")
    assert resp.status_code == 404


async def test_a_reader_can_read_but_not_change_scripts(api: Api) -> None:
    """app_read reads scripts; changing them needs app_manage_scripts."""
    await api.script("hello")
    reader = await api.user("reader", Capability.APP_READ)
    assert (await api.call("GET", f"{_scripts(api)}/hello", reader)).status_code == 200
    resp = await api.call("PUT", f"{_scripts(api)}/hello", reader, {"source": "x"})
    assert resp.status_code == 403


# -- routes ---------------------------------------------------------------------------


async def test_create_route_answers_its_wire_form(api: Api) -> None:
    """201 with id, upper-cased method, path, script and dispatch mode (sync default)."""
    await api.script("s")
    resp = await api.call(
        "POST", _routes(api), body={"method": "get", "path": "/items/{id}", "script": "s"}
    )
    assert resp.status_code == 201
    body = resp.json()
    assert {k: body[k] for k in ("method", "path", "script", "dispatch_mode")} == {
        "method": "GET",
        "path": "/items/{id}",
        "script": "s",
        "dispatch_mode": "sync",
    }
    assert (await api.call("GET", _routes(api))).json() == {"items": [body], "next_cursor": None}


async def test_a_route_is_read_by_id_as_listed_with_its_registrant(api: Api) -> None:
    """GET /routes/{route_id} answers the route as the list and the create do, with
    ``registered_by`` (whose rights its script runs with); another id is 404."""
    await api.script("s")
    created = (
        await api.call("POST", _routes(api), body={"method": "GET", "path": "/r", "script": "s"})
    ).json()
    owner = await api.deps.users.authenticate(api.owner)
    assert owner is not None
    assert created["registered_by"] == str(owner.id)
    got = await api.call("GET", f"{_routes(api)}/{created['id']}")
    assert got.json() == created
    assert (await api.call("GET", _routes(api))).json()["items"] == [created]
    missing = await api.call("GET", f"{_routes(api)}/{uuid.uuid4()}")
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "not_found")


async def test_create_async_route(api: Api) -> None:
    """``dispatch_mode: async`` is stored and answered."""
    await api.script("s")
    resp = await api.call(
        "POST",
        _routes(api),
        body={"method": "POST", "path": "/jobs", "script": "s", "dispatch_mode": "async"},
    )
    assert resp.json()["dispatch_mode"] == "async"
    [target] = await api.deps.routes.routes_for_app("shop")  # type: ignore[misc]
    assert target.dispatch_mode == "async"


async def test_same_method_and_path_is_409(api: Api) -> None:
    """One route per method and path."""
    await api.script("s")
    await api.route("GET", "/x", "s")
    resp = await api.call("POST", _routes(api), body={"method": "GET", "path": "/x", "script": "s"})
    assert resp.status_code == 409


@pytest.mark.parametrize("taken", ["/u/{id}", "/u/{name}"])
async def test_a_path_that_differs_only_in_param_names_is_409(api: Api, taken: str) -> None:
    """``/u/{id}`` and ``/u/{name}`` match the same requests: the same path, so the
    second is 409 conflict, as an exact duplicate is. A literal segment where the
    other has a param, or another method, is a different route."""
    await api.script("s")
    await api.route("GET", "/u/{id}/posts/{post}", "s")
    await api.route("GET", taken, "s")
    body = {"method": "GET", "path": "/u/{name}", "script": "s"}
    resp = await api.call("POST", _routes(api), body=body)
    assert resp.status_code == 409, resp.text
    assert resp.json()["error"]["code"] == "conflict"
    assert taken in resp.json()["error"]["message"]
    body = {"method": "GET", "path": "/u/{a}/posts/{b}", "script": "s"}
    assert (await api.call("POST", _routes(api), body=body)).status_code == 409
    await api.route("POST", "/u/{name}", "s")
    await api.route("GET", "/u/me", "s")
    await api.route("GET", "/u/{id}/posts/latest", "s")
    paths = [r["path"] for r in (await api.call("GET", _routes(api))).json()["items"]]
    assert sorted(paths) == sorted(
        [taken, "/u/{id}/posts/{post}", "/u/{name}", "/u/me", "/u/{id}/posts/latest"]
    )


async def test_two_creates_of_one_path_at_once_make_one_route(api: Api) -> None:
    """``/u/{id}`` and ``/u/{name}`` created at the same moment: one 201, one 409."""
    await api.script("s")
    statuses: list[int] = []

    async def create(path: str) -> None:
        body = {"method": "GET", "path": path, "script": "s"}
        statuses.append((await api.call("POST", _routes(api), body=body)).status_code)

    async with anyio.create_task_group() as tg:
        tg.start_soon(create, "/u/{id}")
        tg.start_soon(create, "/u/{name}")
    assert sorted(statuses) == [201, 409]
    assert len((await api.call("GET", _routes(api))).json()["items"]) == 1


async def test_route_to_an_unknown_script_is_422(api: Api) -> None:
    """The script must exist in the app: unknown_script."""
    resp = await api.call("POST", _routes(api), body={"method": "GET", "path": "/", "script": "x"})
    assert resp.status_code == 422
    assert resp.json()["error"]["code"] == "unknown_script"


@pytest.mark.parametrize(
    "body",
    [
        {"method": "FETCH", "path": "/", "script": "s"},
        {"method": "GET", "path": "no-slash", "script": "s"},
        {"method": "GET", "path": "/{a}/{a}", "script": "s"},
        {"method": "GET", "path": "/x{a}", "script": "s"},
        {"method": "GET", "path": "/", "script": "s", "dispatch_mode": "later"},
        {"method": "GET", "path": "/", "script": "s", "dispatch_mode": 1},
        {"method": 1, "path": "/", "script": "s"},
        {"path": "/", "script": "s"},
        {"method": "GET", "script": "s"},
        {"method": "GET", "path": "/"},
    ],
)
async def test_malformed_route_bodies_are_422(api: Api, body: dict) -> None:
    """Bad method, path, mode or mistyped/missing fields answer 422."""
    await api.script("s")
    resp = await api.call("POST", _routes(api), body=body)
    assert resp.status_code == 422, resp.text


async def test_delete_route_then_it_is_gone(api: Api) -> None:
    """DELETE answers 204, then 404."""
    await api.script("s")
    route = await api.route("GET", "/", "s")
    assert (await api.call("DELETE", f"{_routes(api)}/{route['id']}")).status_code == 204
    assert (await api.call("DELETE", f"{_routes(api)}/{route['id']}")).status_code == 404
    assert await api.deps.routes.routes_for_app("shop") == []


@pytest.mark.parametrize("route_id", ["nope", "00000000-0000-4000-8000-000000000000"])
async def test_delete_an_unknown_route_is_404(api: Api, route_id: str) -> None:
    """Malformed and unknown route ids answer 404."""
    assert (await api.call("DELETE", f"{_routes(api)}/{route_id}")).status_code == 404


async def test_another_apps_route_cannot_be_deleted_through_this_app(api: Api) -> None:
    """Route ids are scoped to their app."""
    other = await api.app("blog")
    await api.script("s", app_id=other)
    route = await api.route("GET", "/", "s", app_id=other)
    assert (await api.call("DELETE", f"{_routes(api)}/{route['id']}")).status_code == 404
    assert (await api.call("GET", _routes(api))).json()["items"] == []
    assert len((await api.call("GET", _routes(api, other))).json()["items"]) == 1


async def test_routes_page_by_path_then_method(api: Api) -> None:
    """The route listing pages through (path, method) with cursors."""
    await api.script("s")
    for method, path in [("POST", "/b"), ("GET", "/b"), ("GET", "/a")]:
        await api.route(method, path, "s")
    first = (await api.client.get(_routes(api), params={"limit": 2}, headers=_h(api))).json()
    rest = (
        await api.client.get(
            _routes(api), params={"limit": 2, "cursor": first["next_cursor"]}, headers=_h(api)
        )
    ).json()
    keys = [(r["path"], r["method"]) for r in first["items"] + rest["items"]]
    assert keys == [("/a", "GET"), ("/b", "GET"), ("/b", "POST")]
    assert rest["next_cursor"] is None


def _h(api: Api) -> dict[str, str]:
    return {"Authorization": f"Bearer {api.owner}"}
