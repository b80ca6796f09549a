"""The caps on apps per user and scripts per app, and script sources in the storage
quota, through the admin API."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from manager_core.api import AdminDeps
from manager_core.postgres import apps as apps_module
from manager_core.postgres import scripts as scripts_module
from manager_core.postgres.storage import PostgresStorageRepo
from manager_core.storage import StorageQuota
from tests.manager.api.conftest import PREFIX, build_app
from tests.manager.api.helpers import Api

pytestmark = pytest.mark.anyio


def assert_error(resp: httpx.Response, status: int, code: str) -> None:
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["code"] == code


def source_of(size: int) -> str:
    """A script source of exactly ``size`` UTF-8 bytes."""
    head = "def handle(event, ctx):\n    return 1\n#"
    return head + "x" * (size - len(head))


@pytest.fixture
async def quota_api(engine: AsyncEngine) -> AsyncIterator[Api]:
    """The admin API with a storage quota of 1000 bytes (its usage read every time)."""
    quota = StorageQuota(PostgresStorageRepo(engine), 1000, refresh=0.0)
    deps = AdminDeps.from_engine(engine, quota=quota)
    transport = httpx.ASGITransport(app=build_app(deps))
    async with httpx.AsyncClient(transport=transport, base_url="http://test" + PREFIX) as c:
        yield await Api.start(c, deps)


async def test_post_apps_past_the_users_cap_is_limit_exceeded(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user with the cap's number of apps created gets 422 limit_exceeded on the
    next POST /apps; deleting one of them makes room again."""
    monkeypatch.setattr(apps_module, "MAX_APPS_PER_USER", 3)
    await api.app("two")  # the owner made "shop" already: this is the 2nd
    third = await api.app("three")
    resp = await api.call("POST", "/apps", body={"name": "four"})
    assert_error(resp, 422, "limit_exceeded")
    assert "at most 3 apps" in resp.json()["error"]["message"]
    assert (await api.call("DELETE", f"/apps/{third}")).status_code == 204
    await api.app("four")


async def test_the_apps_cap_counts_each_user_and_exempts_instance_admins(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another user has their own room; an instance admin has no cap."""
    monkeypatch.setattr(apps_module, "MAX_APPS_PER_USER", 1)
    assert_error(await api.call("POST", "/apps", body={"name": "two"}), 422, "limit_exceeded")
    await api.app("other", await api.user("other"))
    for name in ("r1", "r2"):
        await api.app(name, api.root)


async def test_post_scripts_past_the_apps_cap_is_limit_exceeded(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The app's cap-th script is created; the next one is 422 limit_exceeded."""
    monkeypatch.setattr(scripts_module, "MAX_SCRIPTS_PER_APP", 2)
    await api.script("a")
    await api.script("b")
    resp = await api.call(
        "POST", f"/apps/{api.app_id}/scripts", api.root, {"name": "c", "source": "x = 1"}
    )
    assert_error(resp, 422, "limit_exceeded")
    assert resp.json()["error"]["message"] == "an app holds at most 2 scripts"


async def test_a_script_past_the_storage_quota_is_507_and_storage_bytes_counts_it(
    quota_api: Api,
) -> None:
    """Creating or growing a script past the quota is 507 storage_quota_exceeded;
    exactly to it passes; storage_bytes shows the sources; a delete frees them."""
    api = quota_api
    scripts = f"/apps/{api.app_id}/scripts"
    created = await api.call("POST", scripts, body={"name": "a", "source": source_of(600)})
    assert created.status_code == 201, created.text
    resp = await api.call("POST", scripts, body={"name": "b", "source": source_of(401)})
    assert_error(resp, 507, "storage_quota_exceeded")
    resp = await api.call("POST", scripts, body={"name": "b", "source": source_of(400)})
    assert resp.status_code == 201, resp.text
    app = (await api.call("GET", f"/apps/{api.app_id}")).json()
    assert (app["storage_bytes"], app["storage_quota_bytes"]) == (1000, 1000)
    assert_error(
        await api.call("PUT", f"{scripts}/a", body={"source": source_of(601)}),
        507,
        "storage_quota_exceeded",
    )
    assert (await api.call("PUT", f"{scripts}/a", body={"source": source_of(100)})).is_success
    assert (await api.call("PUT", f"{scripts}/b", body={"source": source_of(900)})).is_success
    (listed,) = (await api.call("GET", "/apps")).json()["items"]
    assert listed["storage_bytes"] == 1000
    assert (await api.call("DELETE", f"{scripts}/b")).status_code == 204
    app = (await api.call("GET", f"/apps/{api.app_id}")).json()
    assert app["storage_bytes"] == 100
