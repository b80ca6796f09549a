"""Helpers for admin API tests: users, tokens, headers and a seeded app."""

from __future__ import annotations

import base64
import json
from typing import Any

import attrs
import httpx

from manager_core.api import AdminDeps
from picloud_shared.principals import Capability

SOURCE = "def handle(event, ctx):\n    return {'ok': True}\n"


def cursor_list(cursor: str) -> str:
    """The list a ``next_cursor`` names (its first element)."""
    raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    return str(json.loads(raw)[0])


def bearer(token: str) -> dict[str, str]:
    """The Authorization header for ``token``."""
    return {"Authorization": f"Bearer {token}"}


@attrs.define
class Api:
    """A client with an instance admin (``root``) and an owner of the app ``shop``."""

    client: httpx.AsyncClient
    deps: AdminDeps
    root: str
    owner: str
    app_id: str

    @classmethod
    async def start(cls, client: httpx.AsyncClient, deps: AdminDeps) -> Api:
        _, root = await deps.users.create_user("root", instance_admin=True)
        _, owner = await deps.users.create_user("owner")
        resp = await client.post("/apps", json={"name": "shop"}, headers=bearer(owner))
        assert resp.status_code == 201, resp.text
        return cls(client, deps, root, owner, resp.json()["id"])

    async def user(self, name: str, *caps: Capability, app_id: str | None = None) -> str:
        """A new user's token; a member of ``app_id`` (default: shop) when ``caps``."""
        user, token = await self.deps.users.create_user(name)
        if caps:
            resp = await self.client.put(
                f"/apps/{app_id or self.app_id}/members/{user.id}",
                json={"capabilities": [str(c) for c in caps]},
                headers=bearer(self.root),
            )
            assert resp.status_code == 200, resp.text
        return token

    async def user_id(self, name: str) -> tuple[str, str]:
        """A new user's (id, token)."""
        user, token = await self.deps.users.create_user(name)
        return str(user.id), token

    async def app(self, name: str, token: str | None = None) -> str:
        """Create an app as ``token`` (default: owner); its id."""
        resp = await self.client.post(
            "/apps", json={"name": name}, headers=bearer(token or self.owner)
        )
        assert resp.status_code == 201, resp.text
        return str(resp.json()["id"])

    async def script(self, name: str = "s", app_id: str | None = None, **extra: Any) -> dict:
        """Create a script as the owner (or root for another app); its JSON."""
        resp = await self.client.post(
            f"/apps/{app_id or self.app_id}/scripts",
            json={"name": name, "source": SOURCE, **extra},
            headers=bearer(self.root),
        )
        assert resp.status_code == 201, resp.text
        return dict(resp.json())

    async def route(
        self, method: str = "GET", path: str = "/", script: str = "s", app_id: str | None = None
    ) -> dict:
        """Create a route as root; its JSON."""
        resp = await self.client.post(
            f"/apps/{app_id or self.app_id}/routes",
            json={"method": method, "path": path, "script": script},
            headers=bearer(self.root),
        )
        assert resp.status_code == 201, resp.text
        return dict(resp.json())

    async def call(
        self, method: str, path: str, token: str | None = None, body: Any = None
    ) -> httpx.Response:
        """One request as ``token`` (default: owner), with ``body`` as JSON if given."""
        kwargs: dict[str, Any] = {"headers": bearer(token or self.owner)}
        if body is not None:
            kwargs["json"] = body
        return await self.client.request(method, path, **kwargs)
