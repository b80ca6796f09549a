"""A delete that keeps conflicting with running executions is a 503 ``busy``, and a
database that cannot be reached a 503 ``unavailable``, both with ``Retry-After``,
not a 500: nothing changed, and trying again is the answer. While the database is
away, those refusals are logged in a line when they start, one per
``UNAVAILABLE_LOG_SECONDS`` while they last and one when a request is served again."""

from __future__ import annotations

import logging
from typing import Any

import anyio
import attrs
import httpx
import psycopg
import pytest
from sqlalchemy.exc import OperationalError

from manager_core.api import AdminDeps
from manager_core.api._endpoint import UNAVAILABLE_LOG_SECONDS, refusal_log
from manager_core.db import make_engine
from tests.manager.api.conftest import PREFIX, build_app
from tests.manager.api.helpers import Api, bearer
from tests.manager.test_db_recovery import SwitchedRelay

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


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_refusals_while_the_database_is_stopped_are_logged_not_one_per_request(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL stops (every connection cut, new ones refused): thirty requests
    refused 503 are one line, no traceback; one more ten seconds later a second line
    with the count; the first request served once it is back, a last line."""
    clock = Clock()
    async with SwitchedRelay.running(db_url) as relay:
        engine = make_engine(relay.url, pool_size=2, max_overflow=2)
        try:
            deps = attrs.evolve(AdminDeps.from_engine(engine), refusals=refusal_log(clock))
            transport = httpx.ASGITransport(app=build_app(deps))
            async with httpx.AsyncClient(transport=transport, base_url="http://t" + PREFIX) as c:
                api = await Api.start(c, deps)
                caplog.set_level(logging.INFO, "manager_core.api")
                relay.go_away()
                for _ in range(30):
                    r = await c.get("/apps", headers=bearer(api.owner))
                    assert r.status_code == 503
                    assert r.json()["error"]["code"] == "unavailable"
                clock.now += UNAVAILABLE_LOG_SECONDS
                assert (await c.get("/apps", headers=bearer(api.owner))).status_code == 503
                relay.come_back()
                with anyio.fail_after(30):
                    while (await c.get("/apps", headers=bearer(api.owner))).status_code != 200:
                        pass
        finally:
            await engine.dispose()
    records = [r for r in caplog.records if r.name == "manager_core.api"]
    lines = [r.getMessage() for r in records]
    assert len(lines) == 3, lines
    assert lines[0] == (
        "admin API: serving requests failed: the database is unavailable; they are"
        " answered 503 (logged again at most once per 10 s while it lasts)"
    )
    assert lines[1] == (
        "admin API: serving requests still fails: 31 times in 10 s (the database is unavailable)"
    )
    assert lines[2].startswith("admin API: serving requests works again, after ")
    assert not [r for r in records if r.exc_info]


async def test_an_admin_request_that_meets_a_bug_is_logged_with_its_traceback(
    api: Api, deps: AdminDeps, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(*args: Any, **kwargs: Any) -> None:
        raise ValueError("a bug")

    monkeypatch.setattr(deps.users, "authenticate", broken)
    caplog.set_level(logging.INFO, "manager_core.api")
    for _ in range(3):
        r = await api.client.get("/apps", headers=bearer(api.owner))
        assert r.status_code == 500
    records = [r for r in caplog.records if r.name == "manager_core.api"]
    assert len(records) == 3
    assert all(r.exc_info and r.levelname == "ERROR" for r in records)
