"""PostgresHostApi: capability enforcement, app isolation, limits and trigger depth,
all inside the execution's transaction."""

from __future__ import annotations

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
from picloud_shared.ids import AppId
from picloud_shared.limits import MAX_KV_VALUE_BYTES
from picloud_shared.ports import HostApi
from picloud_shared.principals import Capability
from picloud_shared.triggers import CreateDocsTrigger, CreateKvTrigger
from tests.manager import factories

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
