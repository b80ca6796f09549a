"""POST /users, the app endpoints and the member endpoints (/apps/{id}/members)."""

from __future__ import annotations

import re
import uuid

import anyio
import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from manager_core import tables as t
from manager_core.api import AdminDeps
from manager_core.postgres.storage import PostgresStorageRepo
from manager_core.storage import StorageQuota
from picloud_shared.ids import AppId, UserId
from picloud_shared.principals import ALL_CAPABILITIES, Capability
from tests.manager.api.conftest import PREFIX, build_app
from tests.manager.api.helpers import Api, bearer

pytestmark = pytest.mark.anyio


# -- users ----------------------------------------------------------------------------


async def test_admin_creates_a_user_whose_token_works(api: Api) -> None:
    """201 ``{"id", "name", "token"}``; the token authenticates at once."""
    resp = await api.call("POST", "/users", api.root, {"name": "carol"})
    assert resp.status_code == 201
    body = resp.json()
    assert set(body) == {"id", "name", "token", "instance_admin", "created_at"}
    assert body["name"] == "carol"
    listed = (await api.call("GET", "/users", api.root)).json()["items"]
    assert {k: v for k, v in body.items() if k != "token"} in listed  # as GET shows it
    assert body["instance_admin"] is False
    assert (await api.call("GET", "/apps", body["token"])).status_code == 200


async def test_admin_can_create_another_instance_admin(api: Api) -> None:
    """``instance_admin: true`` makes the new user an instance admin."""
    resp = await api.call("POST", "/users", api.root, {"name": "ops", "instance_admin": True})
    token = resp.json()["token"]
    assert (await api.call("GET", f"/apps/{api.app_id}", token)).status_code == 200


async def test_a_non_admin_cannot_create_users(api: Api) -> None:
    """Creating users needs an instance admin: 403."""
    resp = await api.call("POST", "/users", api.owner, {"name": "carol"})
    assert resp.status_code == 403


async def test_duplicate_user_name_is_409(api: Api) -> None:
    """User names are unique."""
    resp = await api.call("POST", "/users", api.root, {"name": "owner"})
    assert resp.status_code == 409


@pytest.mark.parametrize(
    "body", [{}, {"name": ""}, {"name": 3}, {"name": "ok", "instance_admin": "yes"}]
)
async def test_malformed_user_bodies_are_422(api: Api, body: dict) -> None:
    """Missing, invalid or mistyped fields answer 422."""
    resp = await api.call("POST", "/users", api.root, body)
    assert resp.status_code == 422


# -- apps -----------------------------------------------------------------------------


async def test_create_app_answers_its_wire_form(api: Api) -> None:
    """201 ``{"id", "name", "created_at", "storage_bytes", "storage_quota_bytes"}``;
    the creator can use it at once."""
    token = await api.user("dave")
    resp = await api.call("POST", "/apps", token, {"name": "blog"})
    assert resp.status_code == 201
    body = resp.json()
    assert set(body) == {"id", "name", "created_at", "storage_bytes", "storage_quota_bytes"}
    assert (body["name"], body["storage_bytes"], body["storage_quota_bytes"]) == ("blog", 0, None)
    assert (await api.call("GET", f"/apps/{body['id']}", token)).json() == body


async def test_creator_holds_every_capability(api: Api) -> None:
    """The creator may do anything, including deleting the app."""
    token = await api.user("dave")
    app_id = (await api.call("POST", "/apps", token, {"name": "blog"})).json()["id"]
    caps = await api.deps.apps.capabilities_of(app_id, (await _me(api, token)))
    assert caps == ALL_CAPABILITIES
    assert (await api.call("DELETE", f"/apps/{app_id}", token)).status_code == 204


async def _me(api: Api, token: str) -> UserId:
    user = await api.deps.users.authenticate(token)
    assert user is not None
    return user.id


async def test_duplicate_app_name_is_409(api: Api) -> None:
    """App names are unique across the instance, even for another user."""
    token = await api.user("dave")
    resp = await api.call("POST", "/apps", token, {"name": "shop"})
    assert resp.status_code == 409
    assert resp.json()["error"]["code"] == "conflict"


@pytest.mark.parametrize("name", ["Shop", "", "a" * 64, "my_app", "sp ace"])
async def test_invalid_app_names_are_422(api: Api, name: str) -> None:
    """App names are [a-z0-9-]{1,63}."""
    resp = await api.call("POST", "/apps", body={"name": name})
    assert resp.status_code == 422
    assert resp.json()["error"]["code"] == "invalid_name"


async def test_app_name_of_63_characters_is_accepted(api: Api) -> None:
    """The name length limit is inclusive."""
    resp = await api.call("POST", "/apps", body={"name": "a" * 63})
    assert resp.status_code == 201


async def test_list_apps_shows_readable_apps_only(api: Api) -> None:
    """Members see apps where they hold app_read; admins see all."""
    reader = await api.user("reader", Capability.APP_READ)
    writer = await api.user("writer", Capability.APP_WRITE_DATA)
    await api.app("blog")
    names = lambda r: [i["name"] for i in r.json()["items"]]  # noqa: E731
    assert names(await api.call("GET", "/apps", reader)) == ["shop"]
    assert names(await api.call("GET", "/apps", writer)) == []
    assert names(await api.call("GET", "/apps", api.root)) == ["blog", "shop"]
    assert (await api.call("GET", "/apps", writer)).json()["next_cursor"] is None


async def test_delete_app_removes_it_and_its_scripts(api: Api) -> None:
    """DELETE answers 204; the app and what it owned are gone."""
    await api.script("s")
    await api.route("GET", "/", "s")
    resp = await api.call("DELETE", f"/apps/{api.app_id}")
    assert resp.status_code == 204
    assert resp.content == b""
    assert (await api.call("GET", f"/apps/{api.app_id}", api.root)).status_code == 404
    assert await api.deps.routes.routes_for_app("shop") is None


# -- members --------------------------------------------------------------------------


async def test_put_member_grants_capabilities(api: Api) -> None:
    """PUT answers the stored set and the user can act with it."""
    user_id, token = await api.user_id("erin")
    resp = await api.call(
        "PUT", f"/apps/{api.app_id}/members/{user_id}", body={"capabilities": ["app_read"]}
    )
    assert resp.status_code == 200
    member = {
        "app_id": api.app_id,
        "user_id": user_id,
        "name": "erin",
        "capabilities": ["app_read"],
    }
    assert resp.json() == member
    listed = await api.call("GET", f"/apps/{api.app_id}/members/{user_id}")
    assert listed.json() == member  # PUT answers what GET shows
    assert (await api.call("GET", f"/apps/{api.app_id}", token)).status_code == 200
    assert (await api.call("DELETE", f"/apps/{api.app_id}", token)).status_code == 403


async def test_put_member_with_no_capabilities_removes_them(api: Api) -> None:
    """An empty list removes the member: the app becomes invisible (404)."""
    user_id, token = await api.user_id("erin")
    url = f"/apps/{api.app_id}/members/{user_id}"
    await api.call("PUT", url, body={"capabilities": ["app_read"]})
    resp = await api.call("PUT", url, body={"capabilities": []})
    assert resp.json()["capabilities"] == []
    assert (await api.call("GET", f"/apps/{api.app_id}", token)).status_code == 404


@pytest.mark.parametrize(
    "body",
    [{}, {"capabilities": "app_read"}, {"capabilities": [1]}, {"capabilities": ["fly"]}],
)
async def test_malformed_member_bodies_are_422(api: Api, body: dict) -> None:
    """Capabilities are a list of known wire names."""
    user_id, _ = await api.user_id("erin")
    resp = await api.call("PUT", f"/apps/{api.app_id}/members/{user_id}", body=body)
    assert resp.status_code == 422


async def test_an_unknown_capability_is_422_listing_the_known_ones(api: Api) -> None:
    """The message names the unknown capability and every known one, in their order."""
    user_id, _ = await api.user_id("erin")
    resp = await api.call(
        "PUT", f"/apps/{api.app_id}/members/{user_id}", body={"capabilities": ["read"]}
    )
    assert resp.status_code == 422
    allowed = ", ".join(c.value for c in Capability)
    assert resp.json()["error"] == {
        "code": "invalid_input",
        "message": f"unknown capability 'read'; expected one of: {allowed}",
    }
    assert allowed.startswith("app_read, app_delete, app_manage_members, ")


@pytest.mark.parametrize("user_id", ["nope", "00000000-0000-4000-8000-000000000000"])
async def test_put_member_for_an_unknown_user_is_404(api: Api, user_id: str) -> None:
    """The user must exist."""
    resp = await api.call(
        "PUT", f"/apps/{api.app_id}/members/{user_id}", body={"capabilities": ["app_read"]}
    )
    assert resp.status_code == 404


async def test_members_cannot_grant_what_they_do_not_hold(api: Api) -> None:
    """A member manager cannot escalate anyone (themselves included) beyond their own set."""
    manager = await api.user("mgr", Capability.APP_MANAGE_MEMBERS, Capability.APP_READ)
    target_id, _ = await api.user_id("erin")
    me = await _me(api, manager)
    for user_id in (target_id, str(me)):
        resp = await api.call(
            "PUT",
            f"/apps/{api.app_id}/members/{user_id}",
            manager,
            {"capabilities": ["app_read", "app_delete", "app_manage_members"]},
        )
        assert resp.status_code == 403, resp.text


async def test_members_cannot_revoke_what_they_do_not_hold(api: Api) -> None:
    """Removing the owner needs every capability the owner holds."""
    manager = await api.user("mgr", Capability.APP_MANAGE_MEMBERS)
    owner_id = await _me(api, api.owner)
    resp = await api.call(
        "PUT", f"/apps/{api.app_id}/members/{owner_id}", manager, {"capabilities": []}
    )
    assert resp.status_code == 403


async def test_a_delegated_manager_cannot_demote_a_member_above_them(api: Api) -> None:
    """A manager holding app_manage_members alone cannot take it (or anything) from the
    owner, who holds more than they do: 403, nothing changed. They still manage members
    who hold no more than they do."""
    manager = await api.user("mgr", Capability.APP_MANAGE_MEMBERS)
    owner_id = await _me(api, api.owner)
    demoted = sorted(str(c) for c in ALL_CAPABILITIES - {Capability.APP_MANAGE_MEMBERS})
    resp = await api.call(
        "PUT", f"/apps/{api.app_id}/members/{owner_id}", manager, {"capabilities": demoted}
    )
    assert resp.status_code == 403, resp.text
    assert "app_read" in resp.json()["error"]["message"]
    app_id = AppId(uuid.UUID(api.app_id))
    assert await api.deps.apps.capabilities_of(app_id, owner_id) == ALL_CAPABILITIES
    peer_id, _ = await api.user_id("peer")
    url = f"/apps/{api.app_id}/members/{peer_id}"
    assert (
        await api.call("PUT", url, manager, {"capabilities": ["app_manage_members"]})
    ).is_success
    assert (await api.call("DELETE", url, manager)).status_code == 204


async def test_instance_admins_grant_anything(api: Api) -> None:
    """Instance admins are not bound by the no-escalation rule."""
    user_id, _ = await api.user_id("erin")
    resp = await api.call(
        "PUT",
        f"/apps/{api.app_id}/members/{user_id}",
        api.root,
        {"capabilities": sorted(ALL_CAPABILITIES)},
    )
    assert resp.status_code == 200
    assert resp.json()["capabilities"] == sorted(ALL_CAPABILITIES)


async def test_a_deleted_users_token_stops_working(api: Api) -> None:
    """Authentication reads the user table on every call."""
    user_id, token = await api.user_id("erin")
    async with api.deps.users._engine.begin() as conn:
        await conn.execute(t.users.delete().where(t.users.c.id == user_id))
    resp = await api.client.get("/apps", headers=bearer(token))
    assert resp.status_code == 401


async def test_the_last_member_manager_cannot_lose_the_capability(api: Api) -> None:
    """The owner is the only member who can manage members: leaving, or dropping
    app_manage_members, is 409 and changes nothing; once another member holds it, the
    owner may leave."""
    owner_id = await _me(api, api.owner)
    url = f"/apps/{api.app_id}/members/{owner_id}"
    for caps in ([], ["app_read"]):
        resp = await api.call("PUT", url, api.owner, {"capabilities": caps})
        assert resp.status_code == 409, resp.text
        assert "app_manage_members" in resp.json()["error"]["message"]
        resp = await api.call("PUT", url, api.root, {"capabilities": caps})  # admins too
        assert resp.status_code == 409, resp.text
    app_id = AppId(uuid.UUID(api.app_id))
    assert await api.deps.apps.capabilities_of(app_id, owner_id) == ALL_CAPABILITIES

    heir_id, heir = await api.user_id("heir")
    resp = await api.call(
        "PUT",
        f"/apps/{api.app_id}/members/{heir_id}",
        api.owner,
        {"capabilities": ["app_read", "app_manage_members"]},
    )
    assert resp.status_code == 200
    assert (await api.call("PUT", url, api.owner, {"capabilities": []})).status_code == 200
    assert (await api.call("GET", f"/apps/{api.app_id}", heir)).status_code == 200


async def test_members_are_listed_by_name_with_their_capabilities(api: Api) -> None:
    """GET /members pages through every member, by user name, each with their sorted
    capabilities; an instance admin who is not a member is not listed."""
    owner_id = await _me(api, api.owner)
    zed_id, _ = await api.user_id("zed")
    amy_id, _ = await api.user_id("amy")
    url = f"/apps/{api.app_id}/members"
    await api.call("PUT", f"{url}/{zed_id}", body={"capabilities": ["app_write_data", "app_read"]})
    await api.call("PUT", f"{url}/{amy_id}", body={"capabilities": ["app_read"]})
    first = (await api.call("GET", f"{url}?limit=2", api.owner)).json()
    assert first["items"] == [
        {"app_id": api.app_id, "user_id": amy_id, "name": "amy", "capabilities": ["app_read"]},
        {
            "app_id": api.app_id,
            "user_id": str(owner_id),
            "name": "owner",
            "capabilities": sorted(str(c) for c in ALL_CAPABILITIES),
        },
    ]
    rest = (await api.call("GET", f"{url}?limit=2&cursor={first['next_cursor']}")).json()
    assert rest == {
        "items": [
            {
                "app_id": api.app_id,
                "user_id": zed_id,
                "name": "zed",
                "capabilities": ["app_read", "app_write_data"],
            }
        ],
        "next_cursor": None,
    }


async def test_a_reader_sees_one_member_and_a_non_member_is_404(api: Api) -> None:
    """GET /members/{user_id} needs only app_read; a user who is not a member (or no
    user at all) is 404."""
    reader_id, reader = await api.user_id("reader")
    url = f"/apps/{api.app_id}/members"
    await api.call("PUT", f"{url}/{reader_id}", body={"capabilities": ["app_read"]})
    owner_id = await _me(api, api.owner)
    resp = await api.call("GET", f"{url}/{owner_id}", reader)
    assert resp.status_code == 200
    assert resp.json()["name"] == "owner"
    stranger_id, _ = await api.user_id("stranger")
    for user_id in (stranger_id, "00000000-0000-4000-8000-000000000000", "nope"):
        resp = await api.call("GET", f"{url}/{user_id}", reader)
        assert resp.status_code == 404, resp.text
        assert resp.json()["error"]["code"] == "not_found"


async def test_delete_member_removes_them(api: Api) -> None:
    """DELETE /members/{user_id} is 204; the app is then invisible to them, and a
    second DELETE is 404."""
    user_id, token = await api.user_id("erin")
    url = f"/apps/{api.app_id}/members/{user_id}"
    await api.call("PUT", url, body={"capabilities": ["app_read"]})
    assert (await api.call("GET", f"/apps/{api.app_id}", token)).status_code == 200
    assert (await api.call("DELETE", url)).status_code == 204
    assert (await api.call("GET", f"/apps/{api.app_id}", token)).status_code == 404
    assert (await api.call("DELETE", url)).status_code == 404


async def test_delete_member_follows_the_rules_of_put(api: Api) -> None:
    """A manager cannot remove a member holding capabilities the manager lacks (403),
    nor the app's last member manager (409); both change nothing."""
    manager = await api.user("mgr", Capability.APP_MANAGE_MEMBERS)
    owner_id = await _me(api, api.owner)
    url = f"/apps/{api.app_id}/members/{owner_id}"
    assert (await api.call("DELETE", url, manager)).status_code == 403
    mgr_id = await _me(api, manager)
    await api.call("DELETE", f"/apps/{api.app_id}/members/{mgr_id}")  # the owner removes mgr
    resp = await api.call("DELETE", url, api.root)
    assert resp.status_code == 409, resp.text
    app_id = AppId(uuid.UUID(api.app_id))
    assert await api.deps.apps.capabilities_of(app_id, owner_id) == ALL_CAPABILITIES


async def test_two_managers_demoting_each_other_at_once_leave_one(api: Api) -> None:
    """Each change alone keeps a manager; run together they must not remove both
    (they are serialised per app): one answers 200, the other 409."""
    owner_id = await _me(api, api.owner)
    other_id, other = await api.user_id("other")
    caps = sorted(str(c) for c in ALL_CAPABILITIES)
    url = f"/apps/{api.app_id}/members/"
    assert (await api.call("PUT", url + other_id, api.owner, {"capabilities": caps})).is_success
    answers: list[int] = []

    async def demote(token: str, whom: str) -> None:
        resp = await api.call("PUT", url + whom, token, {"capabilities": ["app_read"]})
        answers.append(resp.status_code)

    for _ in range(5):
        answers.clear()
        async with anyio.create_task_group() as tg:
            tg.start_soon(demote, api.owner, other_id)
            tg.start_soon(demote, other, str(owner_id))
        assert sorted(answers) in ([200, 403], [200, 409]), answers
        app_id = AppId(uuid.UUID(api.app_id))
        managers = [
            await api.deps.apps.capabilities_of(app_id, user_id)
            for user_id in (owner_id, UserId(uuid.UUID(other_id)))
        ]
        assert sum(Capability.APP_MANAGE_MEMBERS in (m or ()) for m in managers) == 1
        # give both their capabilities back for the next round
        for whom in (str(owner_id), other_id):
            await api.call("PUT", url + whom, api.root, {"capabilities": caps})


async def test_an_app_shows_its_storage_and_quota(engine: AsyncEngine) -> None:
    """GET /apps/{id} and GET /apps answer storage_bytes (pending writes included)
    and storage_quota_bytes; KV and document writes through the API are counted."""
    quota = StorageQuota(PostgresStorageRepo(engine), 10_000)
    deps = AdminDeps.from_engine(engine, quota=quota)
    transport = httpx.ASGITransport(app=build_app(deps))
    async with httpx.AsyncClient(transport=transport, base_url="http://test" + PREFIX) as c:
        api = await Api.start(c, deps)
        assert (await api.call("PUT", f"/apps/{api.app_id}/kv/k", api.owner, "v" * 8)).is_success
        doc = {"x": 1}
        assert (await api.call("POST", f"/apps/{api.app_id}/docs/c", api.owner, doc)).is_success
        used = 1 + 10 + 1 + 32 + 8  # "k" "vvvvvvvv"; "c" + a 32-char id + {"x": 1}
        one = (await api.call("GET", f"/apps/{api.app_id}", api.owner)).json()
        assert (one["storage_bytes"], one["storage_quota_bytes"]) == (used, 10_000)
        await quota.storage.compact()
        (listed,) = (await api.call("GET", "/apps", api.owner)).json()["items"]
        assert (listed["storage_bytes"], listed["storage_quota_bytes"]) == (used, 10_000)
        big = "x" * 10_000
        resp = await api.call("PUT", f"/apps/{api.app_id}/kv/big", api.owner, big)
        assert resp.status_code == 507
        assert resp.json()["error"]["code"] == "storage_quota_exceeded"


async def test_timestamps_are_utc_with_microseconds_whatever_the_database_zone(
    api: Api, engine: AsyncEngine
) -> None:
    """A database (or a node) in another time zone changes no timestamp the API
    writes: UTC, always with six fractional digits."""
    async with engine.begin() as conn:
        name = await conn.scalar(sa.text("SELECT current_database()"))
        await conn.execute(sa.text(f"ALTER DATABASE \"{name}\" SET timezone TO 'Asia/Kolkata'"))
    await engine.dispose()  # new connections take the database's zone
    async with engine.connect() as conn:
        assert await conn.scalar(sa.text("SHOW timezone")) == "Asia/Kolkata"
    created = (await api.call("POST", "/apps", body={"name": "zoned"})).json()["created_at"]
    listed = (await api.call("GET", "/apps")).json()["items"]
    for stamp in [created, *(a["created_at"] for a in listed)]:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00", stamp), stamp


async def test_a_full_last_page_at_the_largest_limit_has_no_next_cursor(
    api: Api, engine: AsyncEngine
) -> None:
    """With exactly 1000 items, ``limit=1000`` answers them all and ``next_cursor``
    null: the look-ahead row is fetched at the cap too, so no empty page follows."""
    owner = await _me(api, api.owner)
    async with engine.begin() as conn:
        await conn.execute(
            sa.text(
                "INSERT INTO apps (name, created_by) "
                "SELECT 'bulk-' || lpad(g::text, 4, '0'), :owner FROM generate_series(1, 999) g"
            ),
            {"owner": owner},
        )
    page = (await api.call("GET", "/apps?limit=1000", api.root)).json()
    assert (len(page["items"]), page["next_cursor"]) == (1000, None)
    page = (await api.call("GET", "/apps?limit=999", api.root)).json()
    assert len(page["items"]) == 999
    rest_url = f"/apps?limit=999&cursor={page['next_cursor']}"
    rest = (await api.call("GET", rest_url, api.root)).json()
    assert [a["name"] for a in rest["items"]] == ["shop"]
    assert rest["next_cursor"] is None
