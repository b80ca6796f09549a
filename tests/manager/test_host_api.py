"""PostgresHostApi: capability enforcement, app isolation, limits and trigger depth,
all inside the execution's transaction."""

from __future__ import annotations

import json

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from manager_core import tables as t
from manager_core.host_api import PostgresHostApi
from manager_core.outbox_event_emitter import OutboxEventEmitter
from manager_core.postgres.documents import PostgresDocumentRepo
from manager_core.postgres.kv import PostgresKvRepo
from manager_core.postgres.outbox import OutboxSignal
from manager_core.postgres.triggers import PostgresTriggerRepo
from picloud_shared.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    LimitExceeded,
    NotFound,
    PayloadTooLarge,
)
from picloud_shared.events import HttpEvent
from picloud_shared.ids import AppId
from picloud_shared.limits import MAX_KV_VALUE_BYTES
from picloud_shared.ports import HostApi
from picloud_shared.principals import Capability
from picloud_shared.triggers import CreateDocsTrigger, CreateKvTrigger
from tests.executor.test_scripts import (
    DOCS_INSERTED,
    OTHER_KEYS,
    PAGED_DOCS,
    PAGED_KEYS,
    PAGING,
    paging_expected,
)
from tests.manager import factories
from tests.manager.dispatch_world import make_world
from tests.manager.test_dispatcher import sync_answer

pytestmark = pytest.mark.anyio

READ, WRITE = Capability.APP_READ_DATA, Capability.APP_WRITE_DATA


class Repos:
    def __init__(self, engine: AsyncEngine) -> None:
        self.emitter = OutboxEventEmitter(PostgresTriggerRepo(engine), OutboxSignal())
        self.kv = PostgresKvRepo(engine, self.emitter)
        self.docs = PostgresDocumentRepo(engine, self.emitter)


async def _run(
    engine: AsyncEngine,
    app: AppId,
    caps: set[Capability],
    body: object,
    depth: int = 0,
) -> PostgresHostApi:
    """Run ``body(host)`` in one committed transaction, as the dispatcher would."""
    repos = Repos(engine)
    async with engine.begin() as conn:
        host = PostgresHostApi(
            conn, app, factories.principal(app, capabilities=caps), depth, repos.kv, repos.docs
        )
        await body(host)  # type: ignore[operator]
    return host


async def test_is_a_host_api(engine: AsyncEngine) -> None:
    """PostgresHostApi satisfies the HostApi protocol."""
    app = await factories.app(engine)

    async def body(host: PostgresHostApi) -> None:
        assert isinstance(host, HostApi)

    await _run(engine, app, {READ}, body)


async def test_kv_and_docs_round_trip_in_the_transaction(engine: AsyncEngine) -> None:
    """Writes are readable inside the execution and committed with it."""
    app = await factories.app(engine)

    async def body(host: PostgresHostApi) -> None:
        await host.kv_set("a", {"n": 1})
        await host.kv_set("b", 2)
        assert await host.kv_get("a") == {"n": 1}
        assert await host.kv_list("a") == [{"key": "a", "value": {"n": 1}}]
        assert await host.kv_delete("b") is True
        doc_id = await host.docs_insert("c", {"x": 1})
        await host.docs_update("c", doc_id, {"x": 2})
        assert await host.docs_get("c", doc_id) == {"x": 2}
        assert await host.docs_query("c", {"x": 2}) == [{"id": doc_id, "data": {"x": 2}}]
        assert await host.docs_insert("c", {}, id="fixed") == "fixed"
        assert await host.docs_delete("c", "fixed") is True
        await host.log("hello")

    host = await _run(engine, app, {READ, WRITE}, body)
    assert host.logs == ["hello"]
    assert (await PostgresKvRepo(engine).get(app, "a")).value == {"n": 1}  # type: ignore[union-attr]
    assert await PostgresKvRepo(engine).get(app, "b") is None


async def test_reads_need_app_read_data(engine: AsyncEngine) -> None:
    """Every read raises Forbidden without app_read_data."""
    app = await factories.app(engine)

    async def body(host: PostgresHostApi) -> None:
        for call in (
            host.kv_get("k"),
            host.kv_list(),
            host.docs_get("c", "d"),
            host.docs_query("c"),
        ):
            with pytest.raises(Forbidden):
                await call

    await _run(engine, app, {WRITE}, body)


async def test_writes_need_app_write_data(engine: AsyncEngine) -> None:
    """Every write raises Forbidden without app_write_data, and nothing is stored."""
    app = await factories.app(engine)
    await PostgresKvRepo(engine).set(app, "k", 1)

    async def body(host: PostgresHostApi) -> None:
        for call in (
            host.kv_set("k", 2),
            host.kv_delete("k"),
            host.docs_insert("c", {}),
            host.docs_update("c", "d", {}),
            host.docs_delete("c", "d"),
        ):
            with pytest.raises(Forbidden):
                await call

    await _run(engine, app, {READ}, body)
    assert (await PostgresKvRepo(engine).get(app, "k")).value == 1  # type: ignore[union-attr]


async def test_principal_of_another_app_is_forbidden(engine: AsyncEngine) -> None:
    """A principal scoped to a different app cannot touch this app's data."""
    app, other = await factories.app(engine), await factories.app(engine)
    repos = Repos(engine)
    async with engine.begin() as conn:
        host = PostgresHostApi(conn, app, factories.principal(other), 0, repos.kv, repos.docs)
        with pytest.raises(Forbidden):
            await host.kv_get("k")


async def test_data_is_scoped_to_the_execution_app(engine: AsyncEngine) -> None:
    """Another app's keys and documents are invisible and untouched."""
    app, other = await factories.app(engine), await factories.app(engine)
    await PostgresKvRepo(engine).set(other, "k", "theirs")
    await PostgresDocumentRepo(engine).insert(other, "c", {"v": 1}, id="d")

    async def body(host: PostgresHostApi) -> None:
        assert await host.kv_get("k") is None
        assert await host.kv_list() == []
        assert await host.docs_get("c", "d") is None
        assert await host.docs_delete("c", "d") is False
        await host.kv_set("k", "mine")

    await _run(engine, app, {READ, WRITE}, body)
    assert (await PostgresKvRepo(engine).get(other, "k")).value == "theirs"  # type: ignore[union-attr]
    assert await PostgresDocumentRepo(engine).get(other, "c", "d") is not None


async def test_limits_and_errors_surface_as_picloud_errors(engine: AsyncEngine) -> None:
    """Key/value limits, a taken id and a missing document raise the documented errors."""
    app = await factories.app(engine)

    async def body(host: PostgresHostApi) -> None:
        with pytest.raises(LimitExceeded):
            await host.kv_set("x" * 513, 1)
        with pytest.raises(PayloadTooLarge):
            await host.kv_set("k", "x" * MAX_KV_VALUE_BYTES)
        with pytest.raises(InvalidInput):
            await host.kv_list(limit=100_000)
        with pytest.raises(NotFound):
            await host.docs_update("c", "missing", {})

    await _run(engine, app, {READ, WRITE}, body)

    async def conflict(host: PostgresHostApi) -> None:
        await host.docs_insert("c", {}, id="d")
        with pytest.raises(Conflict):
            await host.docs_insert("c", {}, id="d")

    await _run(engine, app, {READ, WRITE}, conflict)


async def test_writes_emit_with_depth_plus_one(engine: AsyncEngine) -> None:
    """A script at depth 2 produces outbox rows and executions at depth 3."""
    app = await factories.app(engine)
    script, user = await factories.script(engine, app), await factories.user(engine)
    triggers = PostgresTriggerRepo(engine)
    await triggers.create_kv_trigger(CreateKvTrigger(app, script, user, "*"))
    await triggers.create_docs_trigger(CreateDocsTrigger(app, script, user, "*"))

    async def body(host: PostgresHostApi) -> None:
        await host.kv_set("k", 1)
        await host.docs_insert("c", {}, id="d")

    await _run(engine, app, {READ, WRITE}, body, depth=2)
    rows = await factories.rows(engine, t.outbox)
    assert sorted(r.source_kind for r in rows) == ["docs", "kv"]
    assert {r.trigger_depth for r in rows} == {3}
    assert {e.trigger_depth for e in await factories.rows(engine, t.executions)} == {3}


async def test_a_nul_the_store_cannot_hold_is_refused_and_the_transaction_goes_on(
    engine: AsyncEngine,
) -> None:
    """Refused before PostgreSQL sees it: a script that catches the error keeps a
    working transaction (a statement PostgreSQL refuses would abort it)."""
    app = await factories.app(engine)

    async def body(host: PostgresHostApi) -> None:
        attempts = [
            host.kv_set("k", "a\x00b"),
            host.kv_set("k", {"nested": ["\x00"]}),
            host.docs_insert("c", {"a\x00": 1}),
            host.docs_insert("c", {"a": [{"b": "\x00"}]}),
            host.docs_query("c", {"a": "x\x00"}),
        ]
        for call in attempts:
            with pytest.raises(InvalidInput, match="NUL"):
                await call
        await host.kv_set("k", "a\\u0000b")  # an escaped backslash is no NUL
        await host.docs_insert("c", {"a": 1}, "d1")

    await _run(engine, app, {READ, WRITE}, body)

    async def check(host: PostgresHostApi) -> None:
        assert await host.kv_get("k") == "a\\u0000b"
        assert await host.docs_get("c", "d1") == {"a": 1}

    await _run(engine, app, {READ}, check)


async def test_after_pages_through_kv_list_and_docs_query(engine: AsyncEngine) -> None:
    """``after`` gives the next page, in key (id) order: pages of two give every key
    of a prefix, and every document a where matches, exactly once; after the last
    one the page is empty."""
    app = await factories.app(engine)
    keys = [f"p:{i}" for i in range(7)]
    ids = ["a", "b", "d1", "d2", "d3"]

    async def body(host: PostgresHostApi) -> None:
        for key in reversed([*keys, "o:9", "p", "p;", "q:0"]):
            await host.kv_set(key, key)
        for doc_id in ("d3", "e", "a", "d0", "d2", "c", "b", "d1"):
            await host.docs_insert("c", {"k": 1 if doc_id in ids else 2}, id=doc_id)

        seen: list[str] = []
        after = None
        for _ in range(10):
            page = await host.kv_list("p:", 2, after=after)
            if not page:
                break
            assert len(page) <= 2
            seen += [str(entry["key"]) for entry in page]
            after = seen[-1]
        assert seen == keys
        assert await host.kv_list("p:", 2, after=keys[-1]) == []
        assert await host.kv_list("p:", 100, "p:~") == []

        found: list[str] = []
        after = None
        for _ in range(10):
            docs = await host.docs_query("c", {"k": 1}, 2, after)
            if not docs:
                break
            found += [str(doc["id"]) for doc in docs]
            after = found[-1]
        assert found == ids
        assert await host.docs_query("c", {"k": 1}, after=ids[-1]) == []
        assert await host.docs_query("c", after="zzz") == []

    await _run(engine, app, {READ, WRITE}, body)


async def test_a_bad_after_is_refused_before_postgresql(engine: AsyncEngine) -> None:
    """``after`` is checked as a key (an id) is, with the same codes, before any
    statement: the transaction goes on."""
    app = await factories.app(engine)

    async def body(host: PostgresHostApi) -> None:
        await host.kv_set("k", 1)
        await host.docs_insert("c", {}, id="d")
        for call, error in (
            (host.kv_list(after="k" * 513), LimitExceeded),
            (host.kv_list(after="a\x00"), InvalidInput),
            (host.kv_list(after=""), InvalidInput),
            (host.kv_list(after=5), InvalidInput),  # type: ignore[arg-type]
            (host.docs_query("c", after="d" * 129), LimitExceeded),
            (host.docs_query("c", after="a\x00"), InvalidInput),
            (host.docs_query("c", after=["d"]), InvalidInput),  # type: ignore[arg-type]
        ):
            with pytest.raises(error):
                await call
        assert await host.kv_list(after="j") == [{"key": "k", "value": 1}]
        assert await host.docs_query("c", after="c") == [{"id": "d", "data": {}}]

    await _run(engine, app, {READ, WRITE}, body)


async def test_a_script_pages_with_after_through_the_dispatcher(engine: AsyncEngine) -> None:
    """The script the executor suite runs on its in-memory host, run by a dispatcher
    on PostgreSQL (worker, bridge, guard, PostgresHostApi): the same pages."""
    async with make_world(engine, max_workers=2) as world:
        for key in reversed(PAGED_KEYS + OTHER_KEYS):
            await world.kv.set(world.app_id, key, int(key[2:]) if key[2:].isdigit() else key)
        for doc_id in DOCS_INSERTED:
            data = {"k": 1 if doc_id in PAGED_DOCS else 2}
            await world.docs.insert(world.app_id, "c", data, doc_id)
        script = await world.script(PAGING)
        route = await world.route(script, "/pages")
        result = await sync_answer(world, script, route, HttpEvent("GET", "/pages"), timeout=30)
    assert result.response is not None, (result.failure, result.message)
    assert json.loads(result.response.body) == paging_expected()
