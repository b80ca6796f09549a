"""An admin API on the test database, reached through httpx's ASGI transport."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette

from manager_core.api import ADMIN_PREFIX, AdminDeps, admin_mount
from tests.manager.api.helpers import Api

PREFIX = ADMIN_PREFIX


def build_app(deps: AdminDeps) -> Starlette:
    """The admin routes mounted as the binary mounts them."""
    return Starlette(routes=[admin_mount(deps)])


@pytest.fixture
def deps(engine: AsyncEngine) -> AdminDeps:
    return AdminDeps.from_engine(engine)


@pytest.fixture
async def client(deps: AdminDeps) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=build_app(deps))
    async with httpx.AsyncClient(transport=transport, base_url="http://test" + PREFIX) as c:
        yield c


@pytest.fixture
async def api(client: httpx.AsyncClient, deps: AdminDeps) -> Api:
    """The client plus an instance admin and a user "owner" owning the app "shop"."""
    return await Api.start(client, deps)
