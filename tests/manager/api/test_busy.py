"""A delete that keeps conflicting with running executions is a 503 ``busy``, and a
database that cannot be reached a 503 ``unavailable``, both with ``Retry-After``,
not a 500: nothing changed, and trying again is the answer."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from sqlalchemy.exc import OperationalError

from manager_core.api import AdminDeps
from tests.manager.api.helpers import Api, bearer

pytestmark = pytest.mark.anyio


async def test_a_delete_that_keeps_conflicting_is_a_503_busy(
    api: Api, deps: AdminDeps, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def conflicting(*args: Any, **kwargs: Any) -> bool:
        raise OperationalError("stmt", {}, psycopg.errors.DeadlockDetected("deadlock detected"))

    monkeypatch.setattr(deps.apps, "delete", conflicting)
    r = await api.client.delete(f"/apps/{api.app_id}", headers=bearer(api.owner))
    assert r.status_code == 503
    assert r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "busy"


async def test_a_database_that_cannot_be_reached_is_a_503_unavailable(
    api: Api, deps: AdminDeps, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def gone(*args: Any, **kwargs: Any) -> bool:
        raise OperationalError(
            "stmt", {}, psycopg.OperationalError("server closed the connection unexpectedly")
        )

    monkeypatch.setattr(deps.apps, "delete", gone)
    r = await api.client.delete(f"/apps/{api.app_id}", headers=bearer(api.owner))
    assert r.status_code == 503
    assert r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "unavailable"
