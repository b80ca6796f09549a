"""What one app may hold: MAX_ROUTES_PER_APP routes, MAX_TRIGGERS_PER_APP triggers, and
MAX_ROUTE_PARAMS params per route path (every request matches against an app's
routes, every write against its triggers)."""

from __future__ import annotations

import anyio
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from manager_core.postgres import routes as routes_module
from manager_core.postgres import triggers as triggers_module
from manager_core.postgres.routes import PostgresRouteRepo
from manager_core.postgres.triggers import PostgresTriggerRepo
from picloud_shared.errors import InvalidInput, LimitExceeded
from picloud_shared.limits import MAX_ROUTE_PARAMS, MAX_ROUTES_PER_APP, MAX_TRIGGERS_PER_APP
from picloud_shared.route_paths import check_route_path
from picloud_shared.triggers import CreateKvTrigger
from tests.manager import factories

pytestmark = pytest.mark.anyio


def test_a_route_path_has_at_most_max_route_params() -> None:
    fits = "/" + "/".join(f"{{p{i}}}" for i in range(MAX_ROUTE_PARAMS))
    assert check_route_path(fits) == fits
    with pytest.raises(InvalidInput, match="at most"):
        check_route_path(fits + "/{one_more}")


async def test_routes_stop_at_the_quota_also_when_created_at_once(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With room for one more route, a second create while the first has not committed
    waits for it (the count and the insert are serialised per app) and is then
    limit_exceeded. Another app is not affected. The real quota is the documented
    one."""
    assert MAX_ROUTES_PER_APP == 500
    monkeypatch.setattr(routes_module, "MAX_ROUTES_PER_APP", 3)
    app, other = await factories.app(engine), await factories.app(engine)
    for a in (app, other):
        await factories.script(engine, a, "s")
    repo = PostgresRouteRepo(engine)
    for i in range(2):
        await repo.create(app, "GET", f"/r{i}", "s")
    second: list[str] = []

    async def create_second() -> None:
        try:
            await repo.create(app, "GET", "/y", "s")
            second.append("made")
        except LimitExceeded as exc:
            second.append(exc.message)

    async with engine.connect() as first:
        await first.begin()
        await repo.create(app, "GET", "/x", "s", conn=first)  # the third, not committed
        async with anyio.create_task_group() as tg:
            tg.start_soon(create_second)
            await anyio.sleep(0.5)
            assert second == []  # waiting for the first
            await first.commit()
    assert second == ["an app holds at most 3 routes"]
    assert len(await repo.list(app)) == 3
    await repo.create(other, "GET", "/r", "s")


async def test_triggers_stop_at_the_quota(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert MAX_TRIGGERS_PER_APP == 500
    monkeypatch.setattr(triggers_module, "MAX_TRIGGERS_PER_APP", 2)
    app = await factories.app(engine)
    script = await factories.script(engine, app)
    user = await factories.user(engine)
    repo = PostgresTriggerRepo(engine)
    for glob in ("a*", "b*"):
        await repo.create_kv_trigger(CreateKvTrigger(app, script, user, glob))
    with pytest.raises(LimitExceeded, match="at most 2 triggers"):
        await repo.create_kv_trigger(CreateKvTrigger(app, script, user, "c*"))
    assert len(await repo.list(app)) == 2
