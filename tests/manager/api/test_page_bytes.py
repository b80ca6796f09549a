"""Lists are bounded in bytes as well as in count: a page stops once it holds
PAGE_BYTES of JSON (its first row always comes), and its cursor leads to the rest.
A script's list or query fails instead of answering part (a page shorter than its
limit would tell a script paging with ``after`` that there is no more)."""

from __future__ import annotations

import uuid

import pytest

from manager_core.host_api import PostgresHostApi
from manager_core.postgres._pages import PAGE_BYTES
from picloud_shared.errors import LimitExceeded
from picloud_shared.ids import AppId
from picloud_shared.limits import MAX_KV_VALUE_BYTES
from picloud_shared.principals import Capability
from tests.manager import factories
from tests.manager.api.helpers import Api, bearer

pytestmark = pytest.mark.anyio

VALUE = "v" * (MAX_KV_VALUE_BYTES - 100)  # a string of about 256 KiB as JSON
N = PAGE_BYTES // MAX_KV_VALUE_BYTES + 8  # more than a page's bytes in all


async def _fill(api: Api) -> AppId:
    app = AppId(uuid.UUID(api.app_id))
    for i in range(N):
        await api.deps.kv.set(app, f"k{i:03d}", VALUE)
    return app


async def test_a_list_page_stops_at_its_bytes_and_its_cursor_leads_on(api: Api) -> None:
    await _fill(api)
    seen: list[str] = []
    pages = []
    cursor = None
    while True:
        params = {"limit": "1000", **({"cursor": cursor} if cursor else {})}
        resp = await api.client.get(
            f"/apps/{api.app_id}/kv", params=params, headers=bearer(api.owner)
        )
        assert resp.status_code == 200
        body = resp.json()
        pages.append(len(body["items"]))
        seen += [item["key"] for item in body["items"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == [f"k{i:03d}" for i in range(N)]
    assert len(pages) == 2
    assert pages[0] * MAX_KV_VALUE_BYTES <= PAGE_BYTES + MAX_KV_VALUE_BYTES


async def test_a_scripts_list_past_the_bytes_fails_rather_than_answering_part(
    api: Api,
) -> None:
    app = await _fill(api)
    principal = factories.principal(app, capabilities={Capability.APP_READ_DATA})
    async with api.deps.users._engine.begin() as conn:
        host = PostgresHostApi(conn, app, principal, 0, api.deps.kv, api.deps.documents)
        with pytest.raises(LimitExceeded, match="ask for fewer"):
            await host.kv_list("", 1000)
        assert len(await host.kv_list("", 10)) == 10
        # A page asked for with ``after`` is bounded the same way, never answered cut.
        with pytest.raises(LimitExceeded, match="ask for fewer"):
            await host.kv_list("", 1000, after="k000")
        page = await host.kv_list("", 10, after="k009")
        assert [entry["key"] for entry in page] == [f"k{i:03d}" for i in range(10, 20)]
