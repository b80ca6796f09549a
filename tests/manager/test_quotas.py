"""What one app may hold: MAX_ROUTES_PER_APP routes, MAX_TRIGGERS_PER_APP triggers,
MAX_SCRIPTS_PER_APP scripts and MAX_ROUTE_PARAMS params per route path (every request
matches against an app's routes, every write against its triggers); and how many apps
one user may have created: MAX_APPS_PER_USER."""

from __future__ import annotations

import uuid

import anyio
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from manager_core.postgres import apps as apps_module
from manager_core.postgres import routes as routes_module
from manager_core.postgres import scripts as scripts_module
from manager_core.postgres import triggers as triggers_module
from manager_core.postgres.apps import PostgresAppRepo
from manager_core.postgres.routes import PostgresRouteRepo
from manager_core.postgres.scripts import PostgresScriptRepo
from manager_core.postgres.triggers import PostgresTriggerRepo
from manager_core.postgres.users import PostgresUserRepo
from picloud_shared.errors import InvalidInput, LimitExceeded, NotFound
from picloud_shared.ids import UserId
from picloud_shared.limits import (
    MAX_APPS_PER_USER,
    MAX_ROUTE_PARAMS,
    MAX_ROUTES_PER_APP,
    MAX_SCRIPTS_PER_APP,
    MAX_TRIGGERS_PER_APP,
)
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


SOURCE = "def handle(event, ctx):\n    pass\n"


async def test_scripts_stop_at_the_quota_also_when_created_at_once(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With room for one more script, a second create while the first has not
    committed waits for it (the count and the insert are serialised per app) and is
    then limit_exceeded. Another app is not affected, and a delete makes room. The
    real cap is the documented one."""
    assert MAX_SCRIPTS_PER_APP == 500
    monkeypatch.setattr(scripts_module, "MAX_SCRIPTS_PER_APP", 3)
    app, other = await factories.app(engine), await factories.app(engine)
    repo = PostgresScriptRepo(engine)
    for i in range(2):
        await repo.create(app, f"s{i}", SOURCE)
    second: list[str] = []

    async def create_second() -> None:
        try:
            await repo.create(app, "y", SOURCE)
            second.append("made")
        except LimitExceeded as exc:
            second.append(exc.message)

    async with engine.connect() as first:
        await first.begin()
        await repo.create(app, "x", SOURCE, conn=first)  # the third, not committed
        async with anyio.create_task_group() as tg:
            tg.start_soon(create_second)
            await anyio.sleep(0.5)
            assert second == []  # waiting for the first
            await first.commit()
    assert second == ["an app holds at most 3 scripts"]
    assert len(await repo.list(app)) == 3
    await repo.create(other, "s", SOURCE)
    assert await repo.delete(app, "s0")
    await repo.create(app, "y", SOURCE)


async def created_apps(engine: AsyncEngine, user: UserId) -> list[str]:
    """The names of the apps ``user`` created."""
    apps = PostgresAppRepo(engine)
    return sorted(a.name for a in await apps.list_visible(user, instance_admin=False))


async def test_apps_stop_at_the_cap_per_user_also_when_created_at_once(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With room for one more app, the user's second create while the first has not
    committed waits for it (the user row is locked) and is then limit_exceeded.
    Another user is not affected, and deleting an app makes room. The real cap is
    the documented one."""
    assert MAX_APPS_PER_USER == 100
    monkeypatch.setattr(apps_module, "MAX_APPS_PER_USER", 3)
    user, other = await factories.user(engine), await factories.user(engine)
    repo = PostgresAppRepo(engine)
    made = [await repo.create(f"a{i}", user) for i in range(2)]
    second: list[str] = []

    async def create_second() -> None:
        try:
            await repo.create("y", user)
            second.append("made")
        except LimitExceeded as exc:
            second.append(exc.message)

    async with engine.connect() as first:
        await first.begin()
        await repo.create("x", user, conn=first)  # the third, not committed
        async with anyio.create_task_group() as tg:
            tg.start_soon(create_second)
            await anyio.sleep(0.5)
            assert second == []  # waiting for the first
            await first.commit()
    assert second == ["a user may have at most 3 apps they created; delete one to create another"]
    assert await created_apps(engine, user) == ["a0", "a1", "x"]
    await repo.create("b", other)
    assert await repo.delete(made[0].id)
    await repo.create("y", user)
    assert await created_apps(engine, user) == ["a1", "x", "y"]


async def test_an_instance_admin_creates_apps_past_the_cap(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cap on apps per user does not apply to an instance admin."""
    monkeypatch.setattr(apps_module, "MAX_APPS_PER_USER", 1)
    admin, _ = await PostgresUserRepo(engine).create_user("root", instance_admin=True)
    repo = PostgresAppRepo(engine)
    for i in range(3):
        await repo.create(f"a{i}", admin.id)


async def test_creating_an_app_for_no_such_user_is_not_found(engine: AsyncEngine) -> None:
    """An app created by a user who does not exist is NotFound, as before the cap."""
    with pytest.raises(NotFound, match="no such user"):
        await PostgresAppRepo(engine).create("a", UserId(uuid.uuid4()))
