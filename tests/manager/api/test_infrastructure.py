"""The admin API's plumbing: bodies, limits, errors, unknown routes, pagination."""

from __future__ import annotations

import base64
import logging
from collections.abc import AsyncIterator

import anyio
import attrs
import httpx
import pytest

from manager_core.api import AdminDeps, _http
from manager_core.api._pagination import ANOTHER_LISTS_CURSOR, encode_cursor
from manager_core.postgres.scripts import PostgresScriptRepo
from picloud_shared.limits import MAX_REQUEST_BODY_BYTES
from tests.manager.api.conftest import build_app
from tests.manager.api.helpers import Api, bearer, cursor_list

pytestmark = pytest.mark.anyio


async def test_unknown_admin_path_is_a_json_404(api: Api) -> None:
    """Paths no endpoint serves answer the API's error body."""
    resp = await api.call("GET", "/nope/nothing")
    assert resp.status_code == 404
    assert resp.json() == {"error": {"code": "not_found", "message": "no such admin endpoint"}}


LISTS = "/api/v1/admin/apps/{app}"


@pytest.mark.parametrize(
    ("method", "path", "message"),
    [
        (
            "GET",
            "/apps/shop",
            "'shop' is not an app id: admin paths take the app's id"
            " (GET /api/v1/admin/apps lists apps with their ids)",
        ),
        (
            "DELETE",
            "/users/owner",
            "'owner' is not a user id: admin paths take the user's id"
            " (GET /api/v1/admin/users lists users with their ids)",
        ),
        (
            "PUT",
            "/apps/{app}/members/owner",
            "'owner' is not a user id: admin paths take the user's id"
            " (GET /api/v1/admin/users lists users with their ids)",
        ),
        (
            "DELETE",
            "/apps/{app}/routes/r1",
            "'r1' is not a route id: admin paths take the route's id"
            f" (GET {LISTS}/routes lists routes with their ids)",
        ),
        (
            "DELETE",
            "/apps/{app}/triggers/t1",
            "'t1' is not a trigger id: admin paths take the trigger's id"
            f" (GET {LISTS}/triggers lists triggers with their ids)",
        ),
        (
            "GET",
            "/apps/{app}/executions/e1",
            "'e1' is not an execution id: admin paths take the execution's id"
            f" (GET {LISTS}/executions lists executions with their ids)",
        ),
        (
            "POST",
            "/apps/{app}/dead-letters/d1/replay",
            "'d1' is not a dead letter id: admin paths take the dead letter's id"
            f" (GET {LISTS}/dead-letters lists dead letters with their ids)",
        ),
    ],
)
async def test_a_name_where_a_path_takes_an_id_says_so(
    api: Api, method: str, path: str, message: str
) -> None:
    """Still 404 not_found, but the message says the path takes the id (not the name
    user routes take) and where those ids are listed."""
    resp = await api.call(method, path.format(app=api.app_id), api.root, body={})
    assert (resp.status_code, resp.json()) == (
        404,
        {"error": {"code": "not_found", "message": message.format(app=api.app_id)}},
    )


@pytest.mark.parametrize("token", ["root", "owner", "stranger"])
async def test_what_a_name_given_as_an_app_id_answers_tells_nothing_of_which_apps_exist(
    api: Api, token: str
) -> None:
    """The name of an existing app (``shop``) and of none get the same "not an app id"
    answer, whoever asks."""
    caller = {"root": api.root, "owner": api.owner}.get(token) or await api.user("stranger")
    existing = await api.call("GET", "/apps/shop", caller)
    missing = await api.call("GET", "/apps/shoq", caller)
    assert existing.status_code == missing.status_code == 404
    said = missing.json()["error"]["message"]
    assert said.startswith("'shoq' is not an app id: ")
    assert existing.json()["error"]["message"] == said.replace("shoq", "shop")


async def test_a_long_non_id_is_shown_cut_short(api: Api) -> None:
    """Past 64 characters the message shows the start of what was given, and "…"."""
    resp = await api.call("GET", "/apps/" + "x" * 500)
    assert resp.json()["error"]["message"].startswith("'" + "x" * 64 + "…' is not an app id")


@pytest.mark.parametrize(
    ("method", "path"), [("GET", "/nope/nothing"), ("PATCH", "/apps/{app}"), ("DELETE", "/users")]
)
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer pc_not_a_token"}])
async def test_without_a_valid_token_even_unknown_paths_and_methods_are_401(
    api: Api, method: str, path: str, headers: dict[str, str]
) -> None:
    """API.md: 401 without a valid token, before 404 or 405 tell what exists."""
    resp = await api.client.request(method, path.format(app=api.app_id), headers=headers)
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == "unauthenticated"
    # Worded as the API's other messages are (not a capitalised sentence).
    assert resp.json()["error"]["message"].startswith("a valid token is required: ")


async def test_unknown_method_on_a_known_path_is_a_json_405(api: Api) -> None:
    """A known path with another method answers 405 with ``Allow``."""
    resp = await api.call("PATCH", f"/apps/{api.app_id}")
    assert resp.status_code == 405
    assert resp.json()["error"] == {
        "code": "method_not_allowed",
        "message": "PATCH is not allowed here (only DELETE, GET)",
    }
    assert resp.headers["allow"] == "DELETE, GET"


@pytest.mark.parametrize("header", ["Basic abc", "Bearer", "Bearer  ", "bearer a b", "token"])
async def test_malformed_authorization_is_unauthenticated(api: Api, header: str) -> None:
    """Only ``Bearer <token>`` authenticates."""
    resp = await api.client.get("/apps", headers={"Authorization": header})
    assert resp.status_code == 401


async def test_bearer_scheme_is_case_insensitive(api: Api) -> None:
    """``bearer`` works as well as ``Bearer``."""
    resp = await api.client.get("/apps", headers={"Authorization": f"bearer {api.owner}"})
    assert resp.status_code == 200


@pytest.mark.parametrize("body", [b"{", b"", b"nope", b'{"name": NaN}', b"\xff\xfe"])
async def test_invalid_json_is_invalid_input(api: Api, body: bytes) -> None:
    """A body that is not JSON answers 422 invalid_input."""
    resp = await api.client.post("/apps", content=body, headers=bearer(api.owner))
    assert resp.status_code == 422
    assert resp.json()["error"]["code"] == "invalid_input"


@pytest.mark.parametrize("body", [b"[]", b'"shop"', b"1", b"null"])
async def test_a_body_that_is_not_an_object_is_invalid_input(api: Api, body: bytes) -> None:
    """Bodies are JSON objects."""
    resp = await api.client.post("/apps", content=body, headers=bearer(api.owner))
    assert resp.status_code == 422
    assert "object" in resp.json()["error"]["message"]


async def test_a_wrong_field_type_names_the_field(api: Api) -> None:
    """A field of the wrong type answers 422 naming it."""
    resp = await api.call("POST", "/apps", body={"name": 5})
    assert resp.status_code == 422
    assert "'name'" in resp.json()["error"]["message"]


async def test_a_missing_field_names_the_field(api: Api) -> None:
    """A missing required field answers 422 naming it."""
    resp = await api.call("POST", "/apps", body={})
    assert resp.status_code == 422
    assert "'name'" in resp.json()["error"]["message"]


async def test_a_body_of_exactly_one_mib_is_accepted(api: Api) -> None:
    """The request body cap is inclusive."""
    core = b'{"name": "padded"}'
    body = core + b" " * (MAX_REQUEST_BODY_BYTES - len(core))
    resp = await api.client.post("/apps", content=body, headers=bearer(api.owner))
    assert resp.status_code == 201, resp.text


async def test_a_body_over_one_mib_is_too_large(api: Api) -> None:
    """One byte past 1 MiB (by Content-Length) answers 413."""
    core = b'{"name": "padded"}'
    body = core + b" " * (MAX_REQUEST_BODY_BYTES + 1 - len(core))
    resp = await api.client.post("/apps", content=body, headers=bearer(api.owner))
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "payload_too_large"


async def test_a_streamed_body_over_one_mib_is_too_large(api: Api) -> None:
    """Without Content-Length, the streamed size is capped too."""

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"name": "padded"'
        for _ in range(17):
            yield b" " * 65536
        yield b"}"

    resp = await api.client.post("/apps", content=chunks(), headers=bearer(api.owner))
    assert "content-length" not in resp.request.headers
    assert resp.status_code == 413


@pytest.mark.parametrize(("pause", "status"), [(0.1, 201), (5.0, 408)])
async def test_a_body_must_arrive_within_the_read_timeout(
    api: Api, monkeypatch: pytest.MonkeyPatch, pause: float, status: int
) -> None:
    """A body still arriving after BODY_READ_TIMEOUT_SECONDS (here 1 s) is 408
    ``request_timeout``, and the connection closes; one that arrives in time is served."""
    assert _http.BODY_READ_TIMEOUT_SECONDS == 30.0
    monkeypatch.setattr(_http, "BODY_READ_TIMEOUT_SECONDS", 1.0)

    async def slow() -> AsyncIterator[bytes]:
        yield b'{"name": '
        await anyio.sleep(pause)
        yield b'"slow"}'

    resp = await api.client.post("/apps", content=slow(), headers=bearer(api.owner))
    assert resp.status_code == status, resp.text
    if status == 408:
        assert resp.json()["error"]["code"] == "request_timeout"
        assert resp.headers["connection"] == "close"


async def test_a_lying_content_length_is_invalid(api: Api) -> None:
    """A non-numeric Content-Length answers 422."""
    headers = {**bearer(api.owner), "Content-Length": "lots"}
    resp = await api.client.post("/apps", content=b'{"name": "x"}', headers=headers)
    assert resp.status_code == 422


class _BrokenScripts(PostgresScriptRepo):
    async def list(self, *args: object, **kwargs: object) -> list:  # type: ignore[override]
        raise RuntimeError("secret-internal-detail")


async def test_an_unexpected_error_is_a_bare_500_and_is_logged(
    api: Api, deps: AdminDeps, caplog: pytest.LogCaptureFixture
) -> None:
    """Internals never reach the client, but they reach the log."""
    broken = attrs.evolve(deps, scripts=_BrokenScripts(engine=deps.scripts._engine))
    transport = httpx.ASGITransport(app=build_app(broken))
    async with httpx.AsyncClient(transport=transport, base_url="http://t/api/v1/admin") as c:
        with caplog.at_level(logging.ERROR, logger="manager_core.api"):
            resp = await c.get(f"/apps/{api.app_id}/scripts", headers=bearer(api.owner))
    assert resp.status_code == 500
    assert resp.json() == {"error": {"code": "internal", "message": "internal error"}}
    assert "secret-internal-detail" in caplog.text


# -- pagination -----------------------------------------------------------------------


@pytest.mark.parametrize("limit", ["0", "1001", "-1", "abc", "1.5", "²"])
async def test_a_bad_limit_is_invalid_input(api: Api, limit: str) -> None:
    """``limit`` is an integer from 1 to 1000."""
    resp = await api.client.get("/apps", params={"limit": limit}, headers=bearer(api.owner))
    assert resp.status_code == 422


@pytest.mark.parametrize("limit", ["1", "1000"])
async def test_limit_accepts_its_edges(api: Api, limit: str) -> None:
    """1 and 1000 are valid limits."""
    resp = await api.client.get("/apps", params={"limit": limit}, headers=bearer(api.owner))
    assert resp.status_code == 200


@pytest.mark.parametrize(
    "cursor",
    [
        "!!!",
        "e30",
        encode_cursor(("a", "b"), "x"),
        "bm90IGpzb24",
        encode_cursor((), "x"),
        base64.urlsafe_b64encode(b'["shop"]').decode(),  # a key alone, no list
        base64.urlsafe_b64encode(b'["a\\u0000b"]').decode(),  # a NUL, PostgreSQL cannot
        base64.urlsafe_b64encode(b'["\\ud800"]').decode(),  # half a surrogate pair
    ],
)
async def test_a_malformed_cursor_is_invalid_input(api: Api, cursor: str) -> None:
    """A cursor that is not one of ours answers 422."""
    resp = await api.client.get("/apps", params={"cursor": cursor}, headers=bearer(api.owner))
    assert resp.status_code == 422
    assert resp.json()["error"]["code"] == "invalid_input"


async def test_pages_walk_every_item_once(api: Api) -> None:
    """Following ``next_cursor`` lists every app exactly once, then stops."""
    for i in range(6):
        await api.app(f"app-{i}")
    names: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params = {"limit": "4", **({"cursor": cursor} if cursor else {})}
        resp = await api.client.get("/apps", params=params, headers=bearer(api.owner))
        body = resp.json()
        names += [item["name"] for item in body["items"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert names == sorted([f"app-{i}" for i in range(6)] + ["shop"])
    assert pages == 2


async def test_a_cursor_works_only_on_its_own_list(api: Api) -> None:
    """A cursor names its list: the same path and query (``limit`` aside, in any
    order) take it; another path or another filter is 422, where it would otherwise
    position that list by a key of this one and skip items unseen."""
    for key in ("a1", "a2", "a3", "b1", "b2"):
        resp = await api.call("PUT", f"/apps/{api.app_id}/kv/{key}", body=1)
        assert resp.status_code == 201
    url = f"/apps/{api.app_id}/kv"
    first = (
        await api.client.get(url, params={"prefix": "a", "limit": 1}, headers=bearer(api.owner))
    ).json()
    cursor = first["next_cursor"]
    assert [i["key"] for i in first["items"]] == ["a1"]
    assert cursor

    rest = await api.client.get(
        url, params={"limit": 5, "cursor": cursor, "prefix": "a"}, headers=bearer(api.owner)
    )
    assert [i["key"] for i in rest.json()["items"]] == ["a2", "a3"]

    for params in ({"prefix": "b"}, {}, {"prefix": "a", "x": "1"}):
        resp = await api.client.get(
            url, params={**params, "cursor": cursor}, headers=bearer(api.owner)
        )
        assert resp.status_code == 422, params
        assert resp.json()["error"] == {"code": "invalid_input", "message": ANOTHER_LISTS_CURSOR}
    other_path = await api.client.get("/apps", params={"cursor": cursor}, headers=bearer(api.owner))
    assert other_path.status_code == 422
    assert other_path.json()["error"]["message"] == ANOTHER_LISTS_CURSOR
    # A key of this list under another list's name is refused as well.
    forged = encode_cursor(("a1",), cursor_list(cursor)[::-1])
    resp = await api.client.get(
        url, params={"prefix": "a", "cursor": forged}, headers=bearer(api.owner)
    )
    assert resp.status_code == 422


async def test_an_exactly_full_page_has_no_next_cursor(api: Api) -> None:
    """When the items end at the page's edge, ``next_cursor`` is null."""
    await api.app("other")
    resp = await api.client.get("/apps", params={"limit": "2"}, headers=bearer(api.owner))
    assert len(resp.json()["items"]) == 2
    assert resp.json()["next_cursor"] is None
