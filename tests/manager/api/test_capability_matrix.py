"""Every admin endpoint against every capability: the table of ``endpoints.py``."""

from __future__ import annotations

import pytest

from manager_core.api import Access, AdminDeps, Resource, admin_routes
from picloud_shared.principals import ALL_CAPABILITIES, Capability
from tests.manager.api.endpoints import APP_ENDPOINTS, ENDPOINTS, Endpoint, seed_world
from tests.manager.api.helpers import Api, bearer

pytestmark = pytest.mark.anyio

ids = [str(e) for e in ENDPOINTS]
app_ids = [str(e) for e in APP_ENDPOINTS]


async def test_the_table_lists_every_admin_endpoint(deps: AdminDeps) -> None:
    """``ENDPOINTS`` and ``admin_routes`` agree on every method, path and access rule."""
    served = {
        (method, route.path, op.access, op.also)
        for route in admin_routes(deps)
        if isinstance(route, Resource)
        for method, op in route.operations.items()
    }
    assert served == {(e.method, e.path, e.access, e.also) for e in ENDPOINTS}


@pytest.mark.parametrize(
    ("endpoint", "missing"),
    [(e, c) for e in APP_ENDPOINTS for c in sorted(e.required)],
    ids=[f"{e} without {c}" for e in APP_ENDPOINTS for c in sorted(e.required)],
)
async def test_a_member_without_the_capability_is_forbidden(
    api: Api, endpoint: Endpoint, missing: Capability
) -> None:
    """Every capability but one the endpoint requires is not enough: 403."""
    world = await seed_world(api)
    token = await api.user("member", *(ALL_CAPABILITIES - {missing}))
    resp = await api.call(endpoint.method, endpoint.url(world), token, endpoint.body)
    assert resp.status_code == 403, resp.text
    assert resp.json()["error"]["code"] == "forbidden"
    assert str(missing) in resp.json()["error"]["message"]


@pytest.mark.parametrize("endpoint", APP_ENDPOINTS, ids=app_ids)
async def test_the_required_capability_alone_is_enough(api: Api, endpoint: Endpoint) -> None:
    """A member holding only the required capabilities succeeds (2xx)."""
    world = await seed_world(api)
    token = await api.user("member", *endpoint.required)
    resp = await api.call(endpoint.method, endpoint.url(world), token, endpoint.body)
    assert resp.status_code < 300, resp.text


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=ids)
async def test_an_instance_admin_may_call_every_endpoint(api: Api, endpoint: Endpoint) -> None:
    """Instance admins hold every capability in every app (2xx without membership)."""
    world = await seed_world(api)
    resp = await api.call(endpoint.method, endpoint.url(world), api.root, endpoint.body)
    assert resp.status_code < 300, resp.text


@pytest.mark.parametrize("endpoint", [e for e in ENDPOINTS if e.access is Access.ANY_USER], ids=str)
async def test_any_user_endpoints_need_no_membership(api: Api, endpoint: Endpoint) -> None:
    """A user who is a member of nothing may still call them (2xx; on their own
    ``{user_id}`` for an endpoint about one's own user)."""
    world = await seed_world(api)
    user_id, token = await api.user_id("loner")
    world = {**world, "user_id": user_id} if endpoint.own_user_only else world
    resp = await api.call(endpoint.method, endpoint.url(world), token, endpoint.body)
    assert resp.status_code < 300, resp.text


@pytest.mark.parametrize("endpoint", [e for e in ENDPOINTS if e.own_user_only], ids=str)
async def test_own_user_endpoints_refuse_other_users(api: Api, endpoint: Endpoint) -> None:
    """On another user's ``{user_id}``, a user who is not an instance admin is 403,
    even holding every app capability."""
    world = await seed_world(api)
    resp = await api.call(endpoint.method, endpoint.url(world), api.owner, endpoint.body)
    assert resp.status_code == 403, resp.text
    assert resp.json()["error"]["code"] == "forbidden"


@pytest.mark.parametrize(
    "endpoint", [e for e in ENDPOINTS if e.access is Access.INSTANCE_ADMIN], ids=str
)
async def test_instance_admin_endpoints_refuse_full_members(api: Api, endpoint: Endpoint) -> None:
    """Holding every app capability does not make a user an instance admin: 403."""
    world = await seed_world(api)
    resp = await api.call(endpoint.method, endpoint.url(world), api.owner, endpoint.body)
    assert resp.status_code == 403, resp.text


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=ids)
async def test_a_missing_token_is_unauthenticated(api: Api, endpoint: Endpoint) -> None:
    """No Authorization header: 401 with a Bearer challenge."""
    world = await seed_world(api)
    resp = await api.client.request(endpoint.method, endpoint.url(world), json=endpoint.body)
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == "unauthenticated"
    assert resp.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=ids)
async def test_a_bad_token_is_unauthenticated(api: Api, endpoint: Endpoint) -> None:
    """An unknown token: 401."""
    world = await seed_world(api)
    resp = await api.client.request(
        endpoint.method, endpoint.url(world), json=endpoint.body, headers=bearer("pc_bogus")
    )
    assert resp.status_code == 401


@pytest.mark.parametrize("endpoint", APP_ENDPOINTS, ids=app_ids)
async def test_another_users_app_is_not_found(api: Api, endpoint: Endpoint) -> None:
    """A non-member is told the app does not exist: 404, never 403."""
    world = await seed_world(api)
    token = await api.user("outsider")
    await api.app("mine", token)
    resp = await api.call(endpoint.method, endpoint.url(world), token, endpoint.body)
    assert resp.status_code == 404, resp.text
    assert resp.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("endpoint", APP_ENDPOINTS, ids=app_ids)
@pytest.mark.parametrize("app_id", ["not-a-uuid", "00000000-0000-4000-8000-000000000000"])
async def test_an_unknown_or_malformed_app_id_is_not_found(
    api: Api, endpoint: Endpoint, app_id: str
) -> None:
    """Even an instance admin gets 404 for an app id that is malformed or unknown."""
    world = await seed_world(api)
    resp = await api.call(endpoint.method, endpoint.url({**world, "id": app_id}), api.root)
    assert resp.status_code == 404, resp.text
