"""Apps' storage on real PostgreSQL: exact accounting through deltas, the compactor,
and the quota at its edge."""

from __future__ import annotations

import anyio
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from manager_core.host_api import PostgresHostApi
from manager_core.postgres import storage as storage_sql
from manager_core.postgres.documents import PostgresDocumentRepo
from manager_core.postgres.kv import PostgresKvRepo
from manager_core.postgres.storage import PostgresStorageRepo
from manager_core.storage import MAX_CACHED_APPS, StorageCompactor, StorageGrowth, StorageQuota
from picloud_shared.errors import Conflict, StorageQuotaExceeded
from picloud_shared.principals import Capability
from tests.manager import factories
from tests.manager.storage_helpers import compacted, pending, recount

pytestmark = pytest.mark.anyio


def repos(engine: AsyncEngine, limit: int | None = None, refresh: float = 0.0) -> tuple:
    """KV and document repos sharing one quota (``refresh`` 0: no caching)."""
    quota = StorageQuota(PostgresStorageRepo(engine), limit, refresh=refresh)
    return PostgresKvRepo(engine, quota=quota), PostgresDocumentRepo(engine, quota=quota), quota


def text_of(size: int) -> str:
    """A JSON string whose ``jsonb::text`` is exactly ``size`` bytes."""
    return "x" * (size - 2)


async def test_accounting_matches_a_recount_after_mixed_writes(engine: AsyncEngine) -> None:
    """After KV sets, overwrites (larger, smaller, equal) and deletes and document
    inserts, updates and deletes, from repos and from a script's host API, the
    folded usage equals a from-scratch recount."""
    app, other = await factories.app(engine), await factories.app(engine)
    kv, docs, _ = repos(engine)
    storage = PostgresStorageRepo(engine)
    await kv.set(app, "k", {"a": 1, "b": [1, 2, 3]})
    await kv.set(app, "k", {"a": 1, "b": [1, 2, 3, 4, 5]})  # grows
    await kv.set(app, "k", {"a": 1})  # shrinks
    await kv.set(app, "k", {"a": 2})  # same size: no delta
    await kv.set(app, "ключ", "значение")  # multi-byte key and value
    await kv.set(app, "null", None)
    await kv.set(app, "gone", [1, 2, 3])
    await kv.delete(app, "gone")
    await kv.delete(app, "never")
    await docs.insert(app, "c", {"x": "y" * 100}, id="d1")
    await docs.insert(app, "c", {"x": 1})
    await docs.update(app, "c", "d1", {"x": "short"})
    await docs.insert(app, "c", {"z": 1}, id="d3")
    await docs.delete(app, "c", "d3")
    await kv.set(other, "k", "another app's")
    async with engine.begin() as conn:
        principal = factories.principal(
            app, capabilities={Capability.APP_READ_DATA, Capability.APP_WRITE_DATA}
        )
        host = PostgresHostApi(conn, app, principal, 0, kv, docs)
        await host.kv_set("s", {"from": "script"})
        await host.kv_set("k", {"a": 12345})
        await host.kv_delete("null")
        doc_id = await host.docs_insert("sc", {"n": [1, 2]})
        await host.docs_update("sc", doc_id, {"n": [1, 2, 3, 4]})
        await host.docs_delete("c", "d1")
    assert host.growth.bytes != 0
    expected = await recount(engine, app)
    assert expected > 0
    assert (await storage.usage([app]))[app] == expected  # pending deltas count
    assert await storage.compact() > 0
    assert await pending(engine) == 0
    assert await compacted(engine, app) == expected
    assert await compacted(engine, other) == await recount(engine, other)
    assert (await storage.usage([app, other])) == {
        app: expected,
        other: await recount(engine, other),
    }


async def test_a_write_of_equal_size_appends_no_delta(engine: AsyncEngine) -> None:
    """Overwriting a value with one of the same size appends no delta row."""
    app = await factories.app(engine)
    kv, _, _ = repos(engine)
    await kv.set(app, "k", 1)
    before = await pending(engine, app)
    await kv.set(app, "k", 2)
    assert await pending(engine, app) == before


async def test_a_rolled_back_transaction_leaves_no_delta(engine: AsyncEngine) -> None:
    """Writes whose transaction rolls back leave no delta and change no usage."""
    app = await factories.app(engine)
    kv, docs, _ = repos(engine)
    async with engine.connect() as conn:
        await conn.begin()
        await kv.set(app, "k", "v" * 1000, conn=conn)
        await docs.insert(app, "c", {"x": 1}, conn=conn)
        assert await pending(engine, app) == 0  # not visible before commit
        await conn.rollback()
    assert await pending(engine, app) == 0
    assert (await PostgresStorageRepo(engine).usage([app]))[app] == 0


async def test_a_second_compactor_does_not_fold_what_the_first_folds(
    engine: AsyncEngine,
) -> None:
    """A compactor that runs while another one's fold is uncommitted waits for it and
    then finds those deltas gone: nothing is counted twice."""
    app = await factories.app(engine)
    kv, _, _ = repos(engine)
    for i in range(20):
        await kv.set(app, f"k{i}", i)
    expected = await recount(engine, app)
    storage = PostgresStorageRepo(engine)
    second: list[int] = []
    async with engine.connect() as first:
        await first.execution_options(isolation_level="READ COMMITTED")
        await first.begin()
        folded = await first.execute(storage_sql._COMPACT)
        assert folded.one().deltas == 20
        async with anyio.create_task_group() as tg:

            async def compact_too() -> None:
                second.append(await storage.compact())

            tg.start_soon(compact_too)
            await anyio.sleep(0.5)
            assert second == []  # waiting for the first fold's rows
            await first.commit()
    assert second == [0]
    assert await compacted(engine, app) == expected


async def test_compactors_running_at_once_with_writers_end_exact(engine: AsyncEngine) -> None:
    """Four compactors looping while writers write: the usage ends equal to a recount."""
    app = await factories.app(engine)
    kv, docs, _ = repos(engine)
    storage = PostgresStorageRepo(engine)
    done = anyio.Event()

    async def writer(n: int) -> None:
        for i in range(30):
            await kv.set(app, f"w{n}:{i % 7}", "v" * (i * n))
            await docs.insert(app, "c", {"i": i, "n": n})
            if i % 3 == 0:
                await kv.delete(app, f"w{n}:{(i + 1) % 7}")

    async def compactor() -> None:
        while not done.is_set():
            await storage.compact()
            await anyio.sleep(0.005)

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(compactor)
        async with anyio.create_task_group() as writers:
            for n in range(1, 5):
                writers.start_soon(writer, n)
        done.set()
    await storage.compact()
    assert await compacted(engine, app) == await recount(engine, app)


async def test_the_compactor_task_folds_on_its_interval_and_stops(engine: AsyncEngine) -> None:
    """StorageCompactor.run folds every interval until stop."""
    app = await factories.app(engine)
    kv, _, _ = repos(engine)
    await kv.set(app, "k", "v")
    compactor = StorageCompactor(PostgresStorageRepo(engine), interval=0.05)
    async with anyio.create_task_group() as tg:
        await tg.start(compactor.run)
        with anyio.fail_after(10):
            while await pending(engine, app):  # noqa: ASYNC110 - polls the database
                await anyio.sleep(0.02)
        compactor.stop()
    assert compactor.runs >= 1
    assert await compacted(engine, app) == await recount(engine, app)


# -- the quota ------------------------------------------------------------------------


async def test_a_kv_write_reaching_the_quota_exactly_passes_one_byte_more_fails(
    engine: AsyncEngine,
) -> None:
    """Usage may reach the quota exactly; a write one byte past it is
    storage_quota_exceeded (507), naming the quota, and changes nothing."""
    app = await factories.app(engine)
    kv, _, _ = repos(engine, limit=100)
    with pytest.raises(StorageQuotaExceeded) as refused:
        await kv.set(app, "k", text_of(100))  # 1 + 100 bytes
    assert refused.value.code == "storage_quota_exceeded"
    assert refused.value.http_status == 507
    assert "100 bytes" in refused.value.message
    assert await kv.get(app, "k") is None
    assert await pending(engine, app) == 0
    await kv.set(app, "k", text_of(99))  # 1 + 99 = 100: exactly the quota
    assert await recount(engine, app) == 100
    with pytest.raises(StorageQuotaExceeded):
        await kv.set(app, "k", text_of(100))  # an overwrite growing by one byte
    with pytest.raises(StorageQuotaExceeded):
        await kv.set(app, "j", 1)  # a new key
    await kv.set(app, "k", text_of(99))  # same size
    assert (await kv.get(app, "k")).version == 2  # type: ignore[union-attr]


async def test_a_document_reaching_the_quota_exactly_passes_one_byte_more_fails(
    engine: AsyncEngine,
) -> None:
    """Document inserts and updates meet the quota at the same edge."""
    app = await factories.app(engine)
    _, docs, _ = repos(engine, limit=50)
    # "c" + "d" + '{"x": "…"}' (9 bytes of frame) = 11 + len(payload)
    with pytest.raises(StorageQuotaExceeded):
        await docs.insert(app, "c", {"x": "y" * 40}, id="d")  # 51 bytes
    await docs.insert(app, "c", {"x": "y" * 39}, id="d")  # 50 bytes
    assert await recount(engine, app) == 50
    with pytest.raises(StorageQuotaExceeded):
        await docs.update(app, "c", "d", {"x": "y" * 40})
    with pytest.raises(StorageQuotaExceeded):
        await docs.insert(app, "c", {}, id="e")
    assert (await docs.get(app, "c", "d")).version == 1  # type: ignore[union-attr]
    await docs.update(app, "c", "d", {"x": "z" * 39})


async def test_inserting_a_taken_id_is_a_conflict_even_over_the_quota(
    engine: AsyncEngine,
) -> None:
    """A document id already taken is 409 ``conflict`` whether or not the insert
    would also pass the quota; a new id past the quota is ``storage_quota_exceeded``."""
    app = await factories.app(engine)
    _, docs, _ = repos(engine, limit=100)
    await docs.insert(app, "c", {"x": "y" * 80}, id="d")  # 91 bytes
    with pytest.raises(Conflict):
        await docs.insert(app, "c", {"x": "y" * 80}, id="d")
    with pytest.raises(StorageQuotaExceeded):
        await docs.insert(app, "c", {"x": "y" * 80}, id="e")


async def test_deletes_and_shrinking_writes_pass_when_over_the_quota(engine: AsyncEngine) -> None:
    """An app over its quota (the quota lowered) may still delete and shrink."""
    app = await factories.app(engine)
    kv, docs, _ = repos(engine)
    await kv.set(app, "a", text_of(500))
    await kv.set(app, "b", text_of(500))
    await docs.insert(app, "c", {"x": "y" * 500}, id="d")
    kv, docs, _ = repos(engine, limit=100)
    await kv.set(app, "a", text_of(400))  # shrinks, still over
    await docs.update(app, "c", "d", {"x": 1})
    assert await kv.delete(app, "b")
    with pytest.raises(StorageQuotaExceeded):
        await kv.set(app, "a", text_of(401))
    assert await docs.delete(app, "c", "d")
    assert await kv.delete(app, "a")
    assert await recount(engine, app) == 0


async def test_one_transaction_counts_its_own_growth(engine: AsyncEngine) -> None:
    """Within one execution the cached usage is not re-read, but the growth the
    execution wrote so far counts: it cannot overshoot by more than one write."""
    app = await factories.app(engine)
    kv, docs, _ = repos(engine, limit=100, refresh=3600)
    growth = StorageGrowth()
    async with engine.begin() as conn:
        await kv.set(app, "a", text_of(59), growth=growth, conn=conn)  # 60 bytes
        assert growth.bytes == 60
        with pytest.raises(StorageQuotaExceeded):
            await kv.set(app, "b", text_of(59), growth=growth, conn=conn)
        await kv.delete(app, "a", growth=growth, conn=conn)
        assert growth.bytes == 0
        await docs.insert(app, "c", {"x": "y" * 39}, id="d", growth=growth, conn=conn)  # 50
        with pytest.raises(StorageQuotaExceeded):
            await docs.insert(app, "c", {"x": "y" * 40}, id="e", growth=growth, conn=conn)
        await kv.set(app, "b", text_of(49), growth=growth, conn=conn)  # 50: exactly full
    assert await recount(engine, app) == 100


async def test_writes_committed_on_this_node_count_before_the_next_read(
    engine: AsyncEngine,
) -> None:
    """One writer after another (admin writes, each its own transaction) with a
    usage read only once an hour: each committed write counts in the node's cached
    usage at once, so the writer stops at the quota, not a refresh later; a delete
    makes room again."""
    app = await factories.app(engine)
    kv, docs, _ = repos(engine, limit=100, refresh=3600)
    await kv.set(app, "a", text_of(39))  # 40 bytes; the usage is read here, as 0
    await docs.insert(app, "c", {"x": "y" * 39}, id="d")  # 50: 90 in all
    with pytest.raises(StorageQuotaExceeded):
        await kv.set(app, "b", text_of(10))  # 11 more: 101
    await kv.set(app, "b", text_of(9))  # 10 more: exactly 100
    await kv.delete(app, "a")  # 40 back
    await docs.insert(app, "c", {"x": "y" * 29}, id="e")  # 40 more: 100 again
    with pytest.raises(StorageQuotaExceeded):
        await kv.set(app, "f", text_of(1))
    assert await recount(engine, app) == 100


async def test_the_quota_reads_an_apps_usage_at_most_once_per_refresh(
    engine: AsyncEngine,
) -> None:
    """The usage a check compares against is cached per node for ``refresh``."""
    app = await factories.app(engine)
    now = [0.0]
    quota = StorageQuota(PostgresStorageRepo(engine), 1000, refresh=1.0, clock=lambda: now[0])
    assert await quota.budget(app, None) == 1000
    await PostgresKvRepo(engine).set(app, "k", text_of(99))  # written elsewhere
    now[0] = 0.9
    assert await quota.budget(app, None) == 1000  # still the cached usage
    now[0] = 1.0
    assert await quota.budget(app, None) == 900
    assert await quota.budget(app, StorageGrowth(50)) == 850


async def test_a_node_forgets_the_usage_of_the_least_recently_checked_apps(
    engine: AsyncEngine,
) -> None:
    """At most ``max_cached_apps`` usages are kept; the least recently checked app is
    forgotten first, and its usage is read afresh when next checked."""
    assert MAX_CACHED_APPS == 10_000
    a, b, c = [await factories.app(engine) for _ in range(3)]
    quota = StorageQuota(PostgresStorageRepo(engine), 1000, refresh=3600)
    quota.max_cached_apps = 2
    for app in (a, b):
        assert await quota.budget(app, None) == 1000
    await PostgresKvRepo(engine).set(a, "k", text_of(99))  # written elsewhere: 100
    await PostgresKvRepo(engine).set(b, "k", text_of(99))
    assert await quota.budget(a, None) == 1000  # cached; a is now the most recent
    assert await quota.budget(c, None) == 1000  # b, least recently checked, goes
    assert await quota.budget(a, None) == 1000  # still cached
    assert await quota.budget(b, None) == 900  # read afresh


async def test_unlimited_checks_nothing_but_still_accounts(engine: AsyncEngine) -> None:
    """Without a quota nothing is refused, and every write is still accounted."""
    app = await factories.app(engine)
    kv, _, quota = repos(engine, limit=None)
    assert await quota.budget(app, None) is None
    await kv.set(app, "k", text_of(10_000))
    assert (await quota.storage.usage([app]))[app] == await recount(engine, app) == 10_001


async def test_deleting_an_app_takes_its_storage_rows(engine: AsyncEngine) -> None:
    """An app deleted leaves neither its app_storage row nor pending deltas."""
    app = await factories.app(engine)
    kv, _, quota = repos(engine)
    await kv.set(app, "a", 1)
    await quota.storage.compact()
    await kv.set(app, "b", 2)
    assert await compacted(engine, app) is not None
    assert await pending(engine, app) == 1
    await factories.delete_app(engine, app)
    assert await compacted(engine, app) is None
    assert await pending(engine, app) == 0
    assert (await quota.storage.usage([app]))[app] == 0
    await quota.storage.compact()  # nothing left to fold for it
