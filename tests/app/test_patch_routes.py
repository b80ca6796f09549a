"""End to end: a route PATCHed through a node's admin API is served as it now is by
that node's very next request (its 1 s route cache forgets it), through the real
``picloud serve`` on a real database."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.app.server import Server
from tests.app.test_contract_tour import Admin

WHO = "def handle(event, ctx):\n    return 'NAME'\n"


@pytest.fixture
def admin(server: Server) -> Iterator[Admin]:
    a = Admin(server)
    try:
        for name in ("old", "new"):
            a.script(name, WHO.replace("NAME", name))
        yield a
    finally:
        a.close()


def test_a_patched_route_is_served_at_once(admin: Admin, user: httpx.Client) -> None:
    """The request right after the PATCH (the route just read into the cache) runs the
    new script, then in the new dispatch mode; the 409 for deleting the old script
    is gone once nothing uses it."""
    route = admin.route("GET", "/who", "old")
    url = f"/apps/{admin.app_name}/who"
    assert user.get(url).text == "old"  # cached now, for 1 s
    patched = admin.ok("PATCH", f"/routes/{route['id']}", {"script": "new"})
    assert patched["script"] == "new"
    assert user.get(url).text == "new"
    admin.ok("PATCH", f"/routes/{route['id']}", {"dispatch_mode": "async"})
    resp = user.get(url)
    assert resp.status_code == 202, resp.text
    admin.ok("DELETE", "/scripts/old", expect=204)
