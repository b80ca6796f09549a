"""Users and tokens: GET /users, GET /users/me, PATCH and DELETE /users/{user_id},
POST /users/{user_id}/token."""

from __future__ import annotations

import uuid

import anyio
import pytest
import sqlalchemy as sa

from manager_core import tables as t
from picloud_shared.ids import UserId
from picloud_shared.principals import ALL_CAPABILITIES, Capability
from tests.manager.api.helpers import Api

pytestmark = pytest.mark.anyio

UNKNOWN = "00000000-0000-4000-8000-000000000000"
ALL_CAPS = sorted(str(c) for c in ALL_CAPABILITIES)


async def _id(api: Api, token: str) -> str:
    resp = await api.call("GET", "/users/me", token)
    assert resp.status_code == 200, resp.text
    return str(resp.json()["id"])


async def _works(api: Api, token: str) -> bool:
    return (await api.call("GET", "/users/me", token)).status_code == 200


# -- listing and who am I -------------------------------------------------------------


async def test_admin_lists_users_by_name_without_tokens(api: Api) -> None:
    """200 ``{"items": [{"id", "name", "instance_admin", "created_at"}], "next_cursor"}``."""
    await api.user("alice")
    resp = await api.call("GET", "/users", api.root)
    assert resp.status_code == 200
    body = resp.json()
    assert [u["name"] for u in body["items"]] == ["alice", "owner", "root"]
    assert body["next_cursor"] is None
    assert all(set(u) == {"id", "name", "instance_admin", "created_at"} for u in body["items"])
    assert [u["instance_admin"] for u in body["items"]] == [False, False, True]


async def test_the_bootstrap_admins_name_is_only_an_instance_admins(api: Api) -> None:
    """``admin`` who is no instance admin is the state a start refuses (exit 1): the API
    refuses to create it, as ``picloud admin create-user admin`` does, and creates it
    as an instance admin."""
    refused = await api.call("POST", "/users", api.root, body={"name": "admin"})
    assert (refused.status_code, refused.json()["error"]["code"]) == (422, "invalid_input")
    assert "bootstrap instance admin" in refused.json()["error"]["message"]
    names = [u["name"] for u in (await api.call("GET", "/users", api.root)).json()["items"]]
    assert "admin" not in names
    made = await api.call(
        "POST", "/users", api.root, body={"name": "admin", "instance_admin": True}
    )
    assert (made.status_code, made.json()["instance_admin"]) == (201, True)


async def test_the_user_list_pages_with_limit_and_cursor(api: Api) -> None:
    """``?limit=2`` then the cursor: every user once, in name order."""
    for name in ("b", "c", "d"):
        await api.user(name)
    names: list[str] = []
    url = "/users?limit=2"
    while True:
        body = (await api.call("GET", url, api.root)).json()
        assert len(body["items"]) <= 2
        names += [u["name"] for u in body["items"]]
        if body["next_cursor"] is None:
            break
        url = f"/users?limit=2&cursor={body['next_cursor']}"
    assert names == ["b", "c", "d", "owner", "root"]


@pytest.mark.parametrize("query", ["limit=0", "limit=1001", "limit=x", "cursor=!!"])
async def test_a_bad_user_list_query_is_422(api: Api, query: str) -> None:
    """A limit outside 1..1000 or a malformed cursor: 422 ``invalid_input``."""
    resp = await api.call("GET", f"/users?{query}", api.root)
    assert resp.status_code == 422
    assert resp.json()["error"]["code"] == "invalid_input"


async def test_me_answers_the_caller(api: Api) -> None:
    """Any user gets their own id, name, instance_admin and created_at."""
    user_id, token = await api.user_id("zoe")
    body = (await api.call("GET", "/users/me", token)).json()
    assert (body["id"], body["name"], body["instance_admin"]) == (user_id, "zoe", False)
    assert set(body) == {"id", "name", "instance_admin", "created_at"}


async def test_me_is_not_a_user_id_elsewhere(api: Api) -> None:
    """``me`` is only the caller's own resource: DELETE is 405, its token path 404."""
    assert (await api.call("DELETE", "/users/me", api.root)).status_code == 405
    assert (await api.call("POST", "/users/me/token", api.root)).status_code == 404


# -- rotating tokens ------------------------------------------------------------------


async def test_admin_rotates_a_users_token(api: Api) -> None:
    """200 ``{"id", "name", "token"}``: the new token works, the old one is 401 at once."""
    user_id, old = await api.user_id("leaky")
    resp = await api.call("POST", f"/users/{user_id}/token", api.root)
    assert resp.status_code == 200
    body = resp.json()
    assert (set(body), body["id"], body["name"]) == ({"id", "name", "token"}, user_id, "leaky")
    assert body["token"] != old
    assert not await _works(api, old)
    assert await _works(api, body["token"])


async def test_a_user_rotates_their_own_token(api: Api) -> None:
    """No instance admin needed for one's own token; the old one stops working."""
    owner_id = await _id(api, api.owner)
    resp = await api.call("POST", f"/users/{owner_id}/token", api.owner)
    assert resp.status_code == 200
    assert not await _works(api, api.owner)
    assert await _works(api, resp.json()["token"])


async def test_a_user_cannot_rotate_another_users_token(api: Api) -> None:
    """403 for someone else's id, or an unknown one; the other token keeps working."""
    user_id, token = await api.user_id("victim")
    for target in (user_id, UNKNOWN):
        resp = await api.call("POST", f"/users/{target}/token", api.owner)
        assert resp.status_code == 403, resp.text
    assert await _works(api, token)


@pytest.mark.parametrize("target", [UNKNOWN, "not-a-uuid"])
async def test_rotating_an_unknown_users_token_is_404(api: Api, target: str) -> None:
    """An instance admin on an unknown or malformed id: 404."""
    resp = await api.call("POST", f"/users/{target}/token", api.root)
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "not_found"


# -- promoting and demoting -----------------------------------------------------------


async def test_promoting_and_demoting_an_instance_admin(api: Api) -> None:
    """PATCH ``{"instance_admin": true}`` gives the admin API; ``false`` takes it away."""
    user_id, token = await api.user_id("ops")
    resp = await api.call("PATCH", f"/users/{user_id}", api.root, {"instance_admin": True})
    assert resp.status_code == 200
    assert resp.json()["instance_admin"] is True
    assert (await api.call("GET", "/users", token)).status_code == 200
    resp = await api.call("PATCH", f"/users/{user_id}", api.root, {"instance_admin": False})
    assert resp.json()["instance_admin"] is False
    assert (await api.call("GET", "/users", token)).status_code == 403


async def test_a_demoted_admin_loses_every_app_they_are_not_a_member_of(api: Api) -> None:
    """After demotion, another user's app is 404 to them as to anyone."""
    user_id, token = await api.user_id("ops")
    await api.call("PATCH", f"/users/{user_id}", api.root, {"instance_admin": True})
    assert (await api.call("GET", f"/apps/{api.app_id}", token)).status_code == 200
    await api.call("PATCH", f"/users/{user_id}", api.root, {"instance_admin": False})
    assert (await api.call("GET", f"/apps/{api.app_id}", token)).status_code == 404


async def test_the_last_instance_admin_cannot_be_demoted(api: Api) -> None:
    """409 ``conflict``, and they stay an instance admin; with another admin it is allowed."""
    root_id = await _id(api, api.root)
    resp = await api.call("PATCH", f"/users/{root_id}", api.root, {"instance_admin": False})
    assert resp.status_code == 409
    assert resp.json()["error"]["code"] == "conflict"
    assert "last instance admin" in resp.json()["error"]["message"]
    assert (await api.call("GET", "/users", api.root)).status_code == 200
    await api.call("POST", "/users", api.root, {"name": "ops", "instance_admin": True})
    resp = await api.call("PATCH", f"/users/{root_id}", api.root, {"instance_admin": False})
    assert resp.status_code == 200


@pytest.mark.parametrize("body", [{}, {"instance_admin": "yes"}, {"instance_admin": 1}, [], "true"])
async def test_malformed_patch_bodies_are_422(api: Api, body: object) -> None:
    """``instance_admin`` is a required boolean: 422 ``invalid_input``."""
    user_id, _ = await api.user_id("ops")
    resp = await api.call("PATCH", f"/users/{user_id}", api.root, body)
    assert resp.status_code == 422
    assert resp.json()["error"]["code"] == "invalid_input"


@pytest.mark.parametrize("target", [UNKNOWN, "not-a-uuid"])
async def test_patching_an_unknown_user_is_404(api: Api, target: str) -> None:
    """An unknown or malformed id: 404."""
    resp = await api.call("PATCH", f"/users/{target}", api.root, {"instance_admin": True})
    assert resp.status_code == 404


async def test_two_admins_demoting_each_other_at_once_leave_one(api: Api) -> None:
    """Each demotion alone keeps an instance admin; run together they are serialised:
    one answers 200, the other 409 (or 403 when it was demoted before it authorised)."""
    root_id = await _id(api, api.root)
    other = await api.call("POST", "/users", api.root, {"name": "o", "instance_admin": True})
    other_id, other_token = other.json()["id"], other.json()["token"]
    answers: list[int] = []

    async def demote(token: str, whom: str) -> None:
        resp = await api.call("PATCH", f"/users/{whom}", token, {"instance_admin": False})
        answers.append(resp.status_code)

    for _ in range(5):
        answers.clear()
        async with anyio.create_task_group() as tg:
            tg.start_soon(demote, api.root, other_id)
            tg.start_soon(demote, other_token, root_id)
        assert sorted(answers) in ([200, 403], [200, 409]), answers
        admins = [u for u in (await api.deps.users.list_users()) if u.is_instance_admin]
        assert len(admins) == 1
        (survivor,) = admins
        loser = other_id if str(survivor.id) == root_id else root_id
        await api.deps.users.set_instance_admin(UserId(uuid.UUID(loser)), True)


# -- deleting -------------------------------------------------------------------------


async def test_deleting_a_user_revokes_their_token_and_memberships(api: Api) -> None:
    """204; their token is 401 at once and no membership of theirs is left."""
    user_id, token = await api.user_id("gone")
    url = f"/apps/{api.app_id}/members/{user_id}"
    assert (await api.call("PUT", url, api.root, {"capabilities": ["app_read"]})).is_success
    assert (await api.call("GET", f"/apps/{api.app_id}", token)).status_code == 200
    resp = await api.call("DELETE", f"/users/{user_id}", api.root)
    assert resp.status_code == 204
    assert (await api.call("GET", f"/apps/{api.app_id}", token)).status_code == 401
    async with api.deps.users._engine.connect() as conn:
        left = await conn.scalar(
            sa.select(sa.func.count())
            .select_from(t.app_members)
            .where(t.app_members.c.user_id == uuid.UUID(user_id))
        )
    assert left == 0
    users = (await api.call("GET", "/users", api.root)).json()["items"]
    assert "gone" not in [u["name"] for u in users]


@pytest.mark.parametrize("target", [UNKNOWN, "not-a-uuid"])
async def test_deleting_an_unknown_user_is_404(api: Api, target: str) -> None:
    """An unknown or malformed id: 404 ``not_found``."""
    resp = await api.call("DELETE", f"/users/{target}", api.root)
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "not_found"


async def test_an_admin_cannot_delete_themselves(api: Api) -> None:
    """409 ``conflict`` even with another instance admin; they still work."""
    await api.call("POST", "/users", api.root, {"name": "ops", "instance_admin": True})
    resp = await api.call("DELETE", f"/users/{await _id(api, api.root)}", api.root)
    assert resp.status_code == 409
    assert "yourself" in resp.json()["error"]["message"]
    assert await _works(api, api.root)


async def test_another_instance_admin_can_be_deleted(api: Api) -> None:
    """A second instance admin (made by POST /users) is revoked by deleting them."""
    made = await api.call("POST", "/users", api.root, {"name": "ops", "instance_admin": True})
    resp = await api.call("DELETE", f"/users/{made.json()['id']}", api.root)
    assert resp.status_code == 204
    assert not await _works(api, made.json()["token"])


async def test_the_only_manager_of_an_app_cannot_be_deleted(api: Api) -> None:
    """The owner is shop's only member holding app_manage_members: 409 naming the app,
    nothing changes; once another member holds it, the delete goes through."""
    owner_id = await _id(api, api.owner)
    resp = await api.call("DELETE", f"/users/{owner_id}", api.root)
    assert resp.status_code == 409
    assert resp.json()["error"]["code"] == "conflict"
    assert "shop" in resp.json()["error"]["message"]
    assert await _works(api, api.owner)
    heir = await api.user("heir", Capability.APP_MANAGE_MEMBERS, Capability.APP_READ)
    assert (await api.call("DELETE", f"/users/{owner_id}", api.root)).status_code == 204
    assert (await api.call("GET", f"/apps/{api.app_id}", heir)).status_code == 200


async def test_a_deleted_creators_app_stays_and_stays_manageable(api: Api) -> None:
    """The app the deleted user created is kept (created_by NULL) with its other
    members, and an instance admin still manages its members."""
    owner_id = await _id(api, api.owner)
    heir_id, heir = await api.user_id("heir")
    url = f"/apps/{api.app_id}/members/"
    assert (await api.call("PUT", url + heir_id, api.owner, {"capabilities": ALL_CAPS})).is_success
    assert (await api.call("DELETE", f"/users/{owner_id}", api.root)).status_code == 204
    assert (await api.call("GET", f"/apps/{api.app_id}", heir)).status_code == 200
    async with api.deps.users._engine.connect() as conn:
        created_by = await conn.scalar(
            sa.select(t.apps.c.created_by).where(t.apps.c.id == uuid.UUID(api.app_id))
        )
    assert created_by is None
    newbie_id, _ = await api.user_id("newbie")
    resp = await api.call("PUT", url + newbie_id, api.root, {"capabilities": ["app_read"]})
    assert resp.status_code == 200


async def test_two_admins_deleting_each_other_at_once_leave_one(api: Api) -> None:
    """Serialised: one delete answers 204, the other 409 (the last instance admin) or
    401 (its caller was already gone); exactly one instance admin is left."""
    answers: list[int] = []

    async def remove(token: str, whom: str) -> None:
        answers.append((await api.call("DELETE", f"/users/{whom}", token)).status_code)

    for round_ in range(5):
        answers.clear()
        a = await api.call(
            "POST", "/users", api.root, {"name": f"a{round_}", "instance_admin": True}
        )
        b = await api.call(
            "POST", "/users", api.root, {"name": f"b{round_}", "instance_admin": True}
        )
        # root steps down for the round, so a and b are the only instance admins
        root_id = await _id(api, api.root)
        assert (
            await api.call(
                "PATCH", f"/users/{root_id}", a.json()["token"], {"instance_admin": False}
            )
        ).is_success
        async with anyio.create_task_group() as tg:
            tg.start_soon(remove, a.json()["token"], b.json()["id"])
            tg.start_soon(remove, b.json()["token"], a.json()["id"])
        assert sorted(answers) in ([204, 401], [204, 409]), answers
        admins = [u for u in (await api.deps.users.list_users()) if u.is_instance_admin]
        assert len(admins) == 1
        # root is the only instance admin again for the next round
        await api.deps.users.set_instance_admin(UserId(uuid.UUID(root_id)), True)
        await api.deps.users.delete(admins[0].id)
