"""A real dispatcher on a real database with the real sandboxed executor.

``World`` wires the same objects the binary does (minus HTTP): repos, emitter,
outbox, executor, gate, inbox and one or more dispatchers. Tests create an app
and scripts through the repos, write data through the admin-side repos (which fire
triggers), and wait for outcomes in the database.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import attrs
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from executor_core.executor import ProcessExecutor
from manager_core import tables as t
from manager_core.db import make_pool
from manager_core.dispatcher import Dispatcher, DispatcherSettings
from manager_core.host_api import PostgresHostApi
from manager_core.outbox_event_emitter import OutboxEventEmitter
from manager_core.postgres.apps import PostgresAppRepo
from manager_core.postgres.dead_letters import PostgresDeadLetterRepo
from manager_core.postgres.documents import PostgresDocumentRepo
from manager_core.postgres.executions import PostgresExecutionRepo
from manager_core.postgres.kv import PostgresKvRepo
from manager_core.postgres.outbox import OutboxSignal, PostgresOutboxRepo
from manager_core.postgres.scripts import PostgresScriptRepo
from manager_core.postgres.triggers import PostgresTriggerRepo
from manager_core.postgres.users import PostgresUserRepo
from orchestrator_core.inbox import InboxRegistry
from picloud_shared.gate import ExecutionGate
from picloud_shared.ids import AppId, ScriptId, UserId
from picloud_shared.ports import HostApi
from picloud_shared.principals import Principal
from picloud_shared.retry import Backoff, RetryPolicy

FAST_RETRY = RetryPolicy(Backoff.CONSTANT, 10, 10, 3, 0.0)


@attrs.define
class World:
    engine: AsyncEngine
    executor: ProcessExecutor
    gate: ExecutionGate
    inbox: InboxRegistry
    signal: OutboxSignal
    users: PostgresUserRepo
    apps: PostgresAppRepo
    scripts: PostgresScriptRepo
    triggers: PostgresTriggerRepo
    kv: PostgresKvRepo
    docs: PostgresDocumentRepo
    outbox: PostgresOutboxRepo
    emitter: OutboxEventEmitter
    owner: UserId = attrs.field(init=False)
    app_id: AppId = attrs.field(init=False)

    def host_factory(
        self, conn: AsyncConnection, app_id: AppId, principal: Principal, depth: int
    ) -> HostApi:
        return PostgresHostApi(conn, app_id, principal, depth, self.kv, self.docs)

    def dispatcher(self, node_id: str = "node-a", **overrides: Any) -> Dispatcher:
        settings = DispatcherSettings(
            node_id=node_id,
            poll_interval=overrides.pop("poll_interval", 0.02),
            batch_size=overrides.pop("batch_size", 16),
            max_trigger_depth=overrides.pop("max_trigger_depth", 8),
            lease_seconds=overrides.pop("lease_seconds", 30.0),
            shutdown_grace=overrides.pop("shutdown_grace", 5.0),
            recover_interval=overrides.pop("recover_interval", 0.2),
        )
        assert not overrides, overrides
        return Dispatcher(
            engine=self.engine,
            executor=self.executor,
            gate=self.gate,
            inbox=self.inbox,
            host_factory=self.host_factory,
            executions=PostgresExecutionRepo(self.engine),
            dead_letters=PostgresDeadLetterRepo(self.engine, self.outbox, self.emitter),
            outbox=self.outbox,
            signal=self.signal,
            settings=settings,
        )

    async def script(self, source: str, *, name: str | None = None, timeout: int = 10) -> ScriptId:
        created = await self.scripts.create(
            self.app_id, name or f"s-{uuid.uuid4().hex[:8]}", source, timeout_seconds=timeout
        )
        return created.id

    async def route(
        self, script_id: ScriptId, path: str, *, method: str = "GET", dispatch_mode: str = "sync"
    ) -> uuid.UUID:
        """A route of the app to ``script_id``, registered by its owner (written as is)."""
        async with self.engine.begin() as conn:
            stmt = sa.insert(t.routes).values(
                app_id=self.app_id,
                method=method,
                path=path,
                script_id=script_id,
                registered_by=self.owner,
                dispatch_mode=dispatch_mode,
            )
            route_id: uuid.UUID = (await conn.execute(stmt.returning(t.routes.c.id))).scalar_one()
            return route_id

    async def count(self, table: sa.Table, *where: sa.ColumnElement[bool]) -> int:
        async with self.engine.connect() as conn:
            return int(
                (
                    await conn.execute(sa.select(sa.func.count()).select_from(table).where(*where))
                ).scalar_one()
            )

    async def rows(self, table: sa.Table, *where: sa.ColumnElement[bool]) -> list[Any]:
        async with self.engine.connect() as conn:
            return list((await conn.execute(sa.select(table).where(*where))).all())

    async def kv_value(self, key: str) -> Any:
        entry = await self.kv.get(self.app_id, key)
        return None if entry is None else entry.value

    async def wait_for(
        self, check: Callable[[], Any], *, timeout: float = 30.0, interval: float = 0.02
    ) -> None:
        """Poll ``await check()`` until truthy; fail after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            if await check():
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {timeout} s")
            await anyio.sleep(interval)

    async def wait_count(
        self,
        table: sa.Table,
        *where: sa.ColumnElement[bool],
        at_least: int = 1,
        timeout: float = 30.0,
    ) -> None:
        """Wait until ``table`` has at least ``at_least`` rows matching ``where``."""

        async def enough() -> bool:
            return await self.count(table, *where) >= at_least

        await self.wait_for(enough, timeout=timeout)

    async def executions_by_status(self) -> dict[str, int]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                sa.select(t.executions.c.status, sa.func.count()).group_by(t.executions.c.status)
            )
            return {status: n for status, n in rows.all()}

    @asynccontextmanager
    async def running(self, *dispatchers: Dispatcher) -> AsyncIterator[None]:
        """Run dispatchers (default: one) until the block ends, then stop them."""
        ds = dispatchers or (self.dispatcher(),)
        async with anyio.create_task_group() as tg:
            for d in ds:
                await tg.start(d.run)
            try:
                yield
            finally:
                for d in ds:
                    d.stop()


@asynccontextmanager
async def make_world(
    engine: AsyncEngine, *, gate_size: int = 8, max_workers: int = 8, attach_app: bool = True
) -> AsyncIterator[World]:
    signal = OutboxSignal()
    triggers = PostgresTriggerRepo(engine)
    emitter = OutboxEventEmitter(triggers, signal)
    # As in the binary: the outbox's hot statements run on a plain psycopg pool.
    pool = make_pool(engine.url.render_as_string(hide_password=False), max_size=4)
    await pool.open(wait=True)
    async with pool, ProcessExecutor(max_workers, spare_workers=1) as executor:
        world = World(
            engine=engine,
            executor=executor,
            gate=ExecutionGate(gate_size),
            inbox=InboxRegistry(),
            signal=signal,
            users=PostgresUserRepo(engine),
            apps=PostgresAppRepo(engine),
            scripts=PostgresScriptRepo(engine),
            triggers=triggers,
            kv=PostgresKvRepo(engine, emitter),
            docs=PostgresDocumentRepo(engine, emitter),
            outbox=PostgresOutboxRepo(engine, signal, pool=pool),
            emitter=emitter,
        )
        if attach_app:
            owner, _ = await world.users.create_user(f"owner-{uuid.uuid4().hex[:6]}")
            world.owner = owner.id
            world.app_id = (await world.apps.create(f"app-{uuid.uuid4().hex[:8]}", owner.id)).id
        yield world
