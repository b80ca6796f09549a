"""Scripts and routes on real PostgreSQL: limits, versions, isolation, cascade."""

from __future__ import annotations

import uuid

import anyio
import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from manager_core import tables as t
from manager_core.postgres import (
    PostgresAppRepo,
    PostgresRouteRepo,
    PostgresScriptRepo,
    PostgresUserRepo,
)
from picloud_shared.domain import App, DispatchMode, RouteTarget
from picloud_shared.errors import (
    Conflict,
    InvalidInput,
    InvalidName,
    LimitExceeded,
    NotFound,
    PayloadTooLarge,
    UnknownScript,
)
from picloud_shared.ids import AppId, RouteId, ScriptId
from picloud_shared.limits import MAX_SCRIPT_SOURCE_BYTES
from picloud_shared.ports import RouteTable

pytestmark = pytest.mark.anyio

SOURCE = "def handle(event, ctx):\n    return 1\n"


async def _apps(engine: AsyncEngine, *names: str) -> list[App]:
    user, _ = await PostgresUserRepo(engine).create_user("owner")
    apps = PostgresAppRepo(engine)
    return [await apps.create(name, user.id) for name in names]


# -- scripts --------------------------------------------------------------------------


async def test_create_script_round_trips_with_defaults(engine: AsyncEngine) -> None:
    """A new script is version 1 with the documented default limits."""
    [app] = await _apps(engine, "shop")
    scripts = PostgresScriptRepo(engine)
    script = await scripts.create(app.id, "hello", SOURCE)
    assert (script.version, script.timeout_seconds, script.memory_limit_mb) == (1, 10, 128)
    assert await scripts.get(app.id, "hello") == script
    assert await scripts.get_by_id(app.id, script.id) == script


async def test_script_source_limit_is_inclusive(engine: AsyncEngine) -> None:
    """256 KiB of source is accepted; one byte more is PayloadTooLarge."""
    [app] = await _apps(engine, "shop")
    scripts = PostgresScriptRepo(engine)
    await scripts.create(app.id, "edge", "#" * MAX_SCRIPT_SOURCE_BYTES)
    with pytest.raises(PayloadTooLarge):
        await scripts.create(app.id, "over", "#" * (MAX_SCRIPT_SOURCE_BYTES + 1))


async def test_script_source_limit_counts_utf8_bytes(engine: AsyncEngine) -> None:
    """The limit is on encoded bytes, not characters."""
    [app] = await _apps(engine, "shop")
    with pytest.raises(PayloadTooLarge):
        await PostgresScriptRepo(engine).create(
            app.id, "s", "é" * (MAX_SCRIPT_SOURCE_BYTES // 2 + 1)
        )


@pytest.mark.parametrize(("timeout", "memory"), [(1, 16), (300, 2048)])
async def test_script_limits_accept_their_edges(
    engine: AsyncEngine, timeout: int, memory: int
) -> None:
    """timeout_seconds 1-300 and memory_limit_mb 16-2048 are inclusive."""
    [app] = await _apps(engine, "shop")
    script = await PostgresScriptRepo(engine).create(
        app.id, "s", SOURCE, timeout_seconds=timeout, memory_limit_mb=memory
    )
    assert (script.timeout_seconds, script.memory_limit_mb) == (timeout, memory)


@pytest.mark.parametrize(("timeout", "memory"), [(0, 128), (301, 128), (10, 15), (10, 2049)])
async def test_script_limits_reject_beyond_their_edges(
    engine: AsyncEngine, timeout: int, memory: int
) -> None:
    """One past either edge is LimitExceeded."""
    [app] = await _apps(engine, "shop")
    with pytest.raises(LimitExceeded):
        await PostgresScriptRepo(engine).create(
            app.id, "s", SOURCE, timeout_seconds=timeout, memory_limit_mb=memory
        )


@pytest.mark.parametrize("name", ["", "a b", "x" * 64, "ünï"])
async def test_invalid_script_names_are_rejected(engine: AsyncEngine, name: str) -> None:
    """Script names are [A-Za-z0-9_-]{1,63}."""
    [app] = await _apps(engine, "shop")
    with pytest.raises(InvalidName):
        await PostgresScriptRepo(engine).create(app.id, name, SOURCE)


async def test_source_with_nul_is_invalid_input(engine: AsyncEngine) -> None:
    """PostgreSQL text cannot hold NUL; it is rejected up front."""
    [app] = await _apps(engine, "shop")
    with pytest.raises(InvalidInput):
        await PostgresScriptRepo(engine).create(app.id, "s", "a\x00b")


async def test_duplicate_script_name_is_a_conflict(engine: AsyncEngine) -> None:
    """Script names are unique within an app."""
    [app] = await _apps(engine, "shop")
    scripts = PostgresScriptRepo(engine)
    await scripts.create(app.id, "s", SOURCE)
    with pytest.raises(Conflict):
        await scripts.create(app.id, "s", SOURCE)


async def test_same_script_name_in_two_apps_is_fine(engine: AsyncEngine) -> None:
    """Uniqueness is per app."""
    shop, blog = await _apps(engine, "shop", "blog")
    scripts = PostgresScriptRepo(engine)
    await scripts.create(shop.id, "s", SOURCE)
    await scripts.create(blog.id, "s", "x = 2")
    assert (await scripts.get(blog.id, "s")).source == "x = 2"  # type: ignore[union-attr]


async def test_script_for_a_missing_app_is_not_found(engine: AsyncEngine) -> None:
    """Creating a script in an app that does not exist is NotFound."""
    with pytest.raises(NotFound):
        await PostgresScriptRepo(engine).create(AppId(uuid.uuid4()), "s", SOURCE)


async def test_update_bumps_version_and_keeps_unspecified_fields(engine: AsyncEngine) -> None:
    """Each update bumps ``version``; fields not given keep their values."""
    [app] = await _apps(engine, "shop")
    scripts = PostgresScriptRepo(engine)
    await scripts.create(app.id, "s", SOURCE, timeout_seconds=30, memory_limit_mb=64)
    v2 = await scripts.update(app.id, "s", source="x = 2")
    v3 = await scripts.update(app.id, "s", memory_limit_mb=256)
    assert (v2.version, v2.source, v2.timeout_seconds, v2.memory_limit_mb) == (2, "x = 2", 30, 64)
    assert (v3.version, v3.source, v3.timeout_seconds, v3.memory_limit_mb) == (3, "x = 2", 30, 256)


async def test_update_checks_limits_and_existence(engine: AsyncEngine) -> None:
    """Updates obey the same limits, and a missing script is NotFound."""
    [app] = await _apps(engine, "shop")
    scripts = PostgresScriptRepo(engine)
    await scripts.create(app.id, "s", SOURCE)
    with pytest.raises(LimitExceeded):
        await scripts.update(app.id, "s", timeout_seconds=301)
    with pytest.raises(PayloadTooLarge):
        await scripts.update(app.id, "s", source="#" * (MAX_SCRIPT_SOURCE_BYTES + 1))
    with pytest.raises(NotFound):
        await scripts.update(app.id, "missing", source="x")
    assert (await scripts.get(app.id, "s")).version == 1  # type: ignore[union-attr]


async def test_list_scripts_pages_by_name_without_source(engine: AsyncEngine) -> None:
    """Listing walks scripts by name, after a given name."""
    [app] = await _apps(engine, "shop")
    scripts = PostgresScriptRepo(engine)
    for name in ["b", "a", "c"]:
        await scripts.create(app.id, name, SOURCE)
    first = await scripts.list(app.id, limit=2)
    rest = await scripts.list(app.id, limit=2, after=first[-1].name)
    assert [s.name for s in [*first, *rest]] == ["a", "b", "c"]
    assert not hasattr(first[0], "source")


async def test_delete_script_answers_whether_it_existed(engine: AsyncEngine) -> None:
    """Deleting answers ``True`` once, then ``False``."""
    [app] = await _apps(engine, "shop")
    scripts = PostgresScriptRepo(engine)
    await scripts.create(app.id, "s", SOURCE)
    assert await scripts.delete(app.id, "s") is True
    assert await scripts.delete(app.id, "s") is False


async def test_script_used_by_a_route_cannot_be_deleted(engine: AsyncEngine) -> None:
    """A script still bound to a route is a Conflict to delete."""
    [app] = await _apps(engine, "shop")
    scripts = PostgresScriptRepo(engine)
    await scripts.create(app.id, "s", SOURCE)
    await PostgresRouteRepo(engine).create(app.id, "GET", "/", "s")
    await PostgresRouteRepo(engine).create(app.id, "POST", "/{id}", "s")
    with pytest.raises(Conflict, match=r"still used by route GET /, route POST /\{id\};"):
        await scripts.delete(app.id, "s")


async def test_script_used_by_a_trigger_cannot_be_deleted(engine: AsyncEngine) -> None:
    """A script still bound to a trigger is a Conflict to delete."""
    [app] = await _apps(engine, "shop")
    scripts = PostgresScriptRepo(engine)
    script = await scripts.create(app.id, "s", SOURCE)
    async with engine.begin() as conn:
        await conn.execute(insert(t.triggers).values(app_id=app.id, kind="kv", script_id=script.id))
        for _ in range(5):
            await conn.execute(
                insert(t.triggers).values(app_id=app.id, kind="docs", script_id=script.id)
            )
    five_and_more = r"still used by (kv|docs) trigger [0-9a-f-]+, .* and 1 more;"
    with pytest.raises(Conflict, match=five_and_more):
        await scripts.delete(app.id, "s")


async def test_another_apps_script_is_never_visible(engine: AsyncEngine) -> None:
    """Lookups, listing, updates and deletes are scoped to the app."""
    shop, blog = await _apps(engine, "shop", "blog")
    scripts = PostgresScriptRepo(engine)
    script = await scripts.create(shop.id, "secret", SOURCE)
    assert await scripts.get(blog.id, "secret") is None
    assert await scripts.get_by_id(blog.id, script.id) is None
    assert await scripts.list(blog.id) == []
    assert await scripts.delete(blog.id, "secret") is False
    with pytest.raises(NotFound):
        await scripts.update(blog.id, "secret", source="x")


# -- routes ---------------------------------------------------------------------------


async def test_create_route_round_trips(engine: AsyncEngine) -> None:
    """A route upper-cases its method and remembers its script and dispatch mode."""
    [app] = await _apps(engine, "shop")
    script = await PostgresScriptRepo(engine).create(app.id, "s", SOURCE)
    routes = PostgresRouteRepo(engine)
    entry = await routes.create(
        app.id, "post", "/orders/{id}", "s", dispatch_mode=DispatchMode.ASYNC
    )
    assert entry.route.method == "POST"
    assert entry.route.script_id == script.id
    assert entry.route.dispatch_mode is DispatchMode.ASYNC
    assert entry.script_name == "s"
    assert await routes.get(app.id, entry.route.id) == entry
    assert await routes.list(app.id) == [entry]


async def test_route_dispatch_mode_defaults_to_sync(engine: AsyncEngine) -> None:
    """Without a dispatch mode, a route is sync."""
    [app] = await _apps(engine, "shop")
    await PostgresScriptRepo(engine).create(app.id, "s", SOURCE)
    entry = await PostgresRouteRepo(engine).create(app.id, "GET", "/", "s")
    assert entry.route.dispatch_mode is DispatchMode.SYNC


@pytest.mark.parametrize("method", ["FETCH", "", "GE T"])
async def test_unknown_methods_are_rejected(engine: AsyncEngine, method: str) -> None:
    """Only the standard HTTP methods can be routed."""
    [app] = await _apps(engine, "shop")
    await PostgresScriptRepo(engine).create(app.id, "s", SOURCE)
    with pytest.raises(InvalidInput):
        await PostgresRouteRepo(engine).create(app.id, method, "/", "s")


@pytest.mark.parametrize(
    "path",
    ["", "orders", "/a/{1x}", "/a/{id}/{id}", "/a/x{id}", "/a/{id", "/a b", "/a?x=1", "/a#b"],
)
async def test_malformed_paths_are_rejected(engine: AsyncEngine, path: str) -> None:
    """Paths start with '/', params are whole unique identifier segments."""
    [app] = await _apps(engine, "shop")
    await PostgresScriptRepo(engine).create(app.id, "s", SOURCE)
    with pytest.raises(InvalidInput):
        await PostgresRouteRepo(engine).create(app.id, "GET", path, "s")


async def test_route_to_a_missing_script_is_unknown_script(engine: AsyncEngine) -> None:
    """The script must exist in the same app."""
    shop, blog = await _apps(engine, "shop", "blog")
    await PostgresScriptRepo(engine).create(blog.id, "s", SOURCE)
    with pytest.raises(UnknownScript):
        await PostgresRouteRepo(engine).create(shop.id, "GET", "/", "s")


async def test_same_method_and_path_is_a_conflict(engine: AsyncEngine) -> None:
    """One route per method and path in an app; another method is fine."""
    [app] = await _apps(engine, "shop")
    await PostgresScriptRepo(engine).create(app.id, "s", SOURCE)
    routes = PostgresRouteRepo(engine)
    await routes.create(app.id, "GET", "/x", "s")
    await routes.create(app.id, "POST", "/x", "s")
    with pytest.raises(Conflict):
        await routes.create(app.id, "get", "/x", "s")


async def test_paths_differing_only_in_param_names_conflict_also_when_created_at_once(
    engine: AsyncEngine,
) -> None:
    """``GET /u/{name}`` created while ``GET /u/{id}`` is not yet committed waits for
    it (creates are serialised per app) and is then a conflict: one route, never two
    of which one can never be reached."""
    [app] = await _apps(engine, "shop")
    await PostgresScriptRepo(engine).create(app.id, "s", SOURCE)
    routes = PostgresRouteRepo(engine)
    second: list[str] = []

    async def create_second() -> None:
        try:
            await routes.create(app.id, "GET", "/u/{name}", "s")
            second.append("made")
        except Conflict as exc:
            second.append(exc.message)

    async with engine.connect() as first:
        await first.begin()
        await routes.create(app.id, "GET", "/u/{id}", "s", conn=first)
        async with anyio.create_task_group() as tg:
            tg.start_soon(create_second)
            await anyio.sleep(0.5)
            assert second == []  # waiting for the first
            await first.commit()
    assert second == [
        "a route GET /u/{id} already exists (paths that differ only in param names are the same)"
    ]
    assert [e.route.path for e in await routes.list(app.id)] == ["/u/{id}"]


async def test_list_routes_pages_by_path_then_method(engine: AsyncEngine) -> None:
    """Listing walks (path, method) in order, after a given key."""
    [app] = await _apps(engine, "shop")
    await PostgresScriptRepo(engine).create(app.id, "s", SOURCE)
    routes = PostgresRouteRepo(engine)
    for method, path in [("POST", "/b"), ("GET", "/b"), ("GET", "/a"), ("DELETE", "/c")]:
        await routes.create(app.id, method, path, "s")
    first = await routes.list(app.id, limit=2)
    last = first[-1].route
    rest = await routes.list(app.id, limit=10, after=(last.path, last.method))
    keys = [(e.route.path, e.route.method) for e in [*first, *rest]]
    assert keys == [("/a", "GET"), ("/b", "GET"), ("/b", "POST"), ("/c", "DELETE")]


async def test_delete_route_is_scoped_to_its_app(engine: AsyncEngine) -> None:
    """Another app cannot see or delete a route; its own app can, once."""
    shop, blog = await _apps(engine, "shop", "blog")
    await PostgresScriptRepo(engine).create(shop.id, "s", SOURCE)
    routes = PostgresRouteRepo(engine)
    entry = await routes.create(shop.id, "GET", "/", "s")
    assert await routes.get(blog.id, entry.route.id) is None
    assert await routes.list(blog.id) == []
    assert await routes.delete(blog.id, entry.route.id) is False
    assert await routes.delete(shop.id, entry.route.id) is True
    assert await routes.delete(shop.id, entry.route.id) is False
    assert await routes.get(shop.id, RouteId(uuid.uuid4())) is None


async def test_routes_for_app_answers_targets_with_timeouts(engine: AsyncEngine) -> None:
    """The route table carries each route's script and timeout."""
    shop, blog = await _apps(engine, "shop", "blog")
    script = await PostgresScriptRepo(engine).create(shop.id, "s", SOURCE, timeout_seconds=42)
    await PostgresScriptRepo(engine).create(blog.id, "s", SOURCE)
    routes = PostgresRouteRepo(engine)
    entry = await routes.create(shop.id, "GET", "/x/{id}", "s", dispatch_mode=DispatchMode.ASYNC)
    await routes.create(blog.id, "GET", "/y", "s")
    table: RouteTable = routes
    assert await table.routes_for_app("shop") == [
        RouteTarget(
            route_id=entry.route.id,
            app_id=shop.id,
            app_name="shop",
            method="GET",
            path="/x/{id}",
            dispatch_mode=DispatchMode.ASYNC,
            script_id=ScriptId(script.id),
            timeout_seconds=42,
        )
    ]


async def test_routes_for_app_distinguishes_no_routes_from_no_app(engine: AsyncEngine) -> None:
    """An app without routes answers ``[]``; an unknown app ``None``."""
    await _apps(engine, "shop")
    routes = PostgresRouteRepo(engine)
    assert await routes.routes_for_app("shop") == []
    assert await routes.routes_for_app("nope") is None


async def test_routes_for_app_sees_timeout_updates(engine: AsyncEngine) -> None:
    """A script update is visible to the route table at once."""
    [app] = await _apps(engine, "shop")
    scripts = PostgresScriptRepo(engine)
    await scripts.create(app.id, "s", SOURCE)
    await PostgresRouteRepo(engine).create(app.id, "GET", "/", "s")
    await scripts.update(app.id, "s", timeout_seconds=7)
    [target] = await PostgresRouteRepo(engine).routes_for_app("shop")  # type: ignore[misc]
    assert target.timeout_seconds == 7


# -- cascade --------------------------------------------------------------------------


async def test_deleting_an_app_cascades_to_scripts_routes_and_triggers(
    engine: AsyncEngine,
) -> None:
    """App deletion removes its scripts, routes, triggers and members, nothing else."""
    shop, blog = await _apps(engine, "shop", "blog")
    scripts = PostgresScriptRepo(engine)
    routes = PostgresRouteRepo(engine)
    for app in (shop, blog):
        script = await scripts.create(app.id, "s", SOURCE)
        await routes.create(app.id, "GET", "/", "s")
        async with engine.begin() as conn:
            await conn.execute(
                insert(t.triggers).values(app_id=app.id, kind="kv", script_id=script.id)
            )
    assert await PostgresAppRepo(engine).delete(shop.id) is True
    async with engine.connect() as conn:
        for table in (t.scripts, t.routes, t.triggers, t.app_members):
            count = await conn.scalar(select(func.count()).select_from(table))
            assert count == 1, table.name
    assert await routes.routes_for_app("shop") is None
    assert await routes.routes_for_app("blog") is not None


async def test_route_changes_and_script_updates_tell_their_observers(engine: AsyncEngine) -> None:
    """``changed`` callbacks (the node's route cache) run after a route is created or
    deleted or a script updated, and not when nothing changed."""
    [app] = await _apps(engine, "shop")
    scripts, routes = PostgresScriptRepo(engine), PostgresRouteRepo(engine)
    calls: list[str] = []
    scripts.changed.append(lambda: calls.append("script"))
    routes.changed.append(lambda: calls.append("route"))
    await scripts.create(app.id, "s", SOURCE)
    assert calls == []
    entry = await routes.create(app.id, "GET", "/", "s")
    assert calls == ["route"]
    with pytest.raises(Conflict):
        await routes.create(app.id, "GET", "/", "s")
    await scripts.update(app.id, "s", timeout_seconds=20)
    with pytest.raises(NotFound):
        await scripts.update(app.id, "missing", timeout_seconds=20)
    assert await routes.delete(app.id, entry.route.id) is True
    assert await routes.delete(app.id, entry.route.id) is False
    assert calls == ["route", "script", "route"]
    apps = PostgresAppRepo(engine)
    apps.changed.append(lambda: calls.append("app"))
    assert await apps.delete(app.id) is True
    assert calls == ["route", "script", "route", "app", "app"]  # routes gone, then the app
