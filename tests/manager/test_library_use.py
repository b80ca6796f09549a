"""manager-core as a library on a user's own engine, as its module docstring shows."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import manager_core
from manager_core import tables
from manager_core.outbox_event_emitter import OutboxEventEmitter
from manager_core.postgres.apps import PostgresAppRepo
from manager_core.postgres.kv import PostgresKvRepo
from manager_core.postgres.outbox import OutboxSignal
from manager_core.postgres.scripts import PostgresScriptRepo
from manager_core.postgres.triggers import PostgresTriggerRepo
from manager_core.postgres.users import PostgresUserRepo
from picloud_shared.triggers import CreateKvTrigger

pytestmark = pytest.mark.anyio

my_metadata = sa.MetaData()
my_orders = sa.Table("my_orders", my_metadata, sa.Column("id", sa.Integer, primary_key=True))


@pytest.fixture
async def own_engine(empty_db_url: str) -> AsyncIterator[AsyncEngine]:
    """The user's own engine on their own (empty) database, not the test fixtures'."""
    engine = create_async_engine(empty_db_url)
    async with engine.begin() as conn:
        await conn.run_sync(tables.metadata.create_all)
        await conn.run_sync(my_metadata.create_all)
    yield engine
    await engine.dispose()


def test_the_library_use_is_documented() -> None:
    """The package docstring shows how to use it on one's own engine."""
    assert "conn=conn" in (manager_core.__doc__ or "")


async def test_own_writes_kv_writes_and_outbox_rows_commit_together(
    own_engine: AsyncEngine,
) -> None:
    """In one user-owned transaction: all or nothing, including the fanned-out rows."""
    signal = OutboxSignal()
    triggers = PostgresTriggerRepo(own_engine)
    kv = PostgresKvRepo(own_engine, OutboxEventEmitter(triggers, signal))
    user, _ = await PostgresUserRepo(own_engine).create_user(f"u-{uuid.uuid4().hex[:6]}")
    app = await PostgresAppRepo(own_engine).create("lib-app", user.id)
    script = await PostgresScriptRepo(own_engine).create(
        app.id, "s", "def handle(e, c):\n    pass\n"
    )
    await triggers.create_kv_trigger(CreateKvTrigger(app.id, script.id, user.id, "orders:*"))

    async def write_then_fail() -> None:
        async with own_engine.begin() as conn:
            await conn.execute(my_orders.insert().values(id=1))
            await kv.set(app.id, "orders:1", {"total": 3}, conn=conn)
            raise RuntimeError("changed my mind")

    with pytest.raises(RuntimeError, match="changed my mind"):
        await write_then_fail()
    async with own_engine.begin() as conn:
        await conn.execute(my_orders.insert().values(id=2))
        await kv.set(app.id, "orders:2", {"total": 5}, conn=conn)
    signal.committed(conn)

    async with own_engine.connect() as conn:
        orders = (await conn.execute(sa.select(my_orders.c.id))).scalars().all()
        keys = (await conn.execute(sa.select(tables.kv_entries.c.key))).scalars().all()
        payloads = (await conn.execute(sa.select(tables.outbox.c.payload))).scalars().all()
    assert orders == [2]
    assert keys == ["orders:2"]
    assert [p["key"] for p in payloads] == ["orders:2"]
    assert signal.pending
