"""Script sources count in their app's storage, and against its quota, like KV entries
and documents (on real PostgreSQL, through the script repo)."""

from __future__ import annotations

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from manager_core.postgres.kv import PostgresKvRepo
from manager_core.postgres.scripts import PostgresScriptRepo
from manager_core.postgres.storage import PostgresStorageRepo
from manager_core.storage import StorageQuota
from picloud_shared.errors import StorageQuotaExceeded
from picloud_shared.ids import AppId
from tests.manager import factories

pytestmark = pytest.mark.anyio


def source_of(size: int) -> str:
    """A script source of exactly ``size`` UTF-8 bytes."""
    head = "def handle(event, ctx):\n    return 1\n#"
    return head + "x" * (size - len(head))


def quota_of(engine: AsyncEngine, limit: int | None, refresh: float = 0.0) -> StorageQuota:
    """A quota of ``limit`` bytes (``refresh`` 0: it reads the usage every time)."""
    return StorageQuota(PostgresStorageRepo(engine), limit, refresh=refresh)


async def usage(engine: AsyncEngine, app: AppId) -> int:
    return (await PostgresStorageRepo(engine).usage([app]))[app]


async def test_an_apps_usage_counts_its_scripts_sources_in_utf8_bytes(
    engine: AsyncEngine,
) -> None:
    """Creating, updating (larger, smaller) and deleting scripts moves the app's usage
    by their sources' UTF-8 bytes, also without a quota; other apps are untouched."""
    app, other = await factories.app(engine), await factories.app(engine)
    repo = PostgresScriptRepo(engine)
    await repo.create(app, "a", source_of(1000))
    await repo.create(app, "b", "# é\n" + source_of(100))  # "é" is 2 bytes
    assert await usage(engine, app) == 1000 + 105
    await repo.update(app, "a", source=source_of(3000))
    assert await usage(engine, app) == 3000 + 105
    await repo.update(app, "a", source=source_of(200))
    await repo.update(app, "a", timeout_seconds=20)  # the source unchanged
    assert await usage(engine, app) == 200 + 105
    assert await repo.delete(app, "b")
    assert await usage(engine, app) == 200
    assert await usage(engine, other) == 0


async def test_a_script_and_kv_share_the_quota_and_storage_compacts(
    engine: AsyncEngine,
) -> None:
    """A script's bytes and the KV entries' add up against one quota; folding the
    KV deltas changes nothing in the usage."""
    app = await factories.app(engine)
    quota = quota_of(engine, 1000)
    kv = PostgresKvRepo(engine, quota=quota)
    await PostgresScriptRepo(engine, quota).create(app, "s", source_of(900))
    with pytest.raises(StorageQuotaExceeded):
        await kv.set(app, "k", "x" * 98)  # 1 + 100 bytes: one too many
    assert await usage(engine, app) == 900
    await kv.set(app, "k", "x" * 97)
    await quota.storage.compact()
    assert await usage(engine, app) == 1000


async def test_a_script_reaching_the_quota_exactly_passes_one_byte_more_fails(
    engine: AsyncEngine,
) -> None:
    """A create that fills the quota to the byte passes; one byte more is
    storage_quota_exceeded and stores nothing."""
    app = await factories.app(engine)
    repo = PostgresScriptRepo(engine, quota_of(engine, 1000))
    await repo.create(app, "a", source_of(600))
    with pytest.raises(StorageQuotaExceeded, match="quota is 1000 bytes"):
        await repo.create(app, "b", source_of(401))
    assert await repo.get(app, "b") is None
    await repo.create(app, "b", source_of(400))
    assert await usage(engine, app) == 1000


async def test_an_update_growing_past_the_quota_fails_and_shrinking_passes_over_it(
    engine: AsyncEngine,
) -> None:
    """An update is checked against its growth: growing to exactly the quota passes,
    one byte more fails and keeps the old version; over the quota (a smaller limit
    now), an update that shrinks, or keeps the size, passes, and so does a delete."""
    app = await factories.app(engine)
    repo = PostgresScriptRepo(engine, quota_of(engine, 1000))
    await repo.create(app, "a", source_of(500))
    with pytest.raises(StorageQuotaExceeded):
        await repo.update(app, "a", source=source_of(1001))
    kept = await repo.get(app, "a")
    assert kept is not None
    assert (kept.version, len(kept.source)) == (1, 500)
    await repo.update(app, "a", source=source_of(1000))
    tight = PostgresScriptRepo(engine, quota_of(engine, 10))
    await tight.update(app, "a", source=source_of(999))
    await tight.update(app, "a", source=source_of(999).upper())
    await tight.update(app, "a", timeout_seconds=30)
    with pytest.raises(StorageQuotaExceeded):
        await tight.update(app, "a", source=source_of(1000))
    assert await tight.delete(app, "a")
    assert await usage(engine, app) == 0


async def test_script_writes_count_on_this_node_before_the_next_read(
    engine: AsyncEngine,
) -> None:
    """With the usage read once an hour, a create, an update and a delete of this
    node count in its cached usage at once."""
    app = await factories.app(engine)
    quota = quota_of(engine, 1000, refresh=3600)
    repo = PostgresScriptRepo(engine, quota)
    assert await quota.cached_usage(app) == 0
    await repo.create(app, "a", source_of(700))
    with pytest.raises(StorageQuotaExceeded):
        await repo.create(app, "b", source_of(301))
    await repo.update(app, "a", source=source_of(800))
    assert await quota.cached_usage(app) == 800
    assert await repo.delete(app, "a")
    assert await quota.cached_usage(app) == 0
    await repo.create(app, "b", source_of(1000))


async def test_a_script_in_a_rolled_back_transaction_counts_nothing(
    engine: AsyncEngine,
) -> None:
    """A create in a caller's transaction that rolls back leaves the usage, and this
    node's cached usage, as they were."""
    app = await factories.app(engine)
    quota = quota_of(engine, 1000, refresh=3600)
    assert await quota.cached_usage(app) == 0
    async with engine.connect() as conn:
        await conn.begin()
        await PostgresScriptRepo(engine, quota).create(app, "a", source_of(900), conn=conn)
        await conn.rollback()
    assert await usage(engine, app) == 0
    assert await quota.cached_usage(app) == 0


async def test_deleting_an_app_takes_its_scripts_bytes(engine: AsyncEngine) -> None:
    """An app deleted with its scripts stores nothing any more."""
    app = await factories.app(engine)
    await PostgresScriptRepo(engine).create(app, "a", source_of(500))
    assert await usage(engine, app) == 500
    await factories.delete_app(engine, app)
    assert await usage(engine, app) == 0
