"""The composition root: every long-lived object of a picloud node, wired once.

One ``PostgresOutboxRepo`` object is handed out twice, under its two port names:
the dispatcher's ``OutboxRepo`` and the orchestrator's ``OutboxWriter`` — the type
checker proves it satisfies both (seed, commit 6).
"""

from __future__ import annotations

import gc
import os
import secrets
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

import anyio
import attrs
from psycopg_pool import AsyncConnectionPool
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from executor_core.executor import ProcessExecutor
from manager_core.backlog import OutboxBacklog
from manager_core.db import make_engine, make_pool
from manager_core.dispatcher import Dispatcher, DispatcherSettings
from manager_core.host_api import PostgresHostApi
from manager_core.outbox_event_emitter import OutboxEventEmitter
from manager_core.postgres.apps import PostgresAppRepo
from manager_core.postgres.dead_letters import PostgresDeadLetterRepo
from manager_core.postgres.documents import PostgresDocumentRepo
from manager_core.postgres.executions import PostgresExecutionRepo
from manager_core.postgres.kv import PostgresKvRepo
from manager_core.postgres.outbox import OutboxSignal, PostgresOutboxRepo
from manager_core.postgres.routes import PostgresRouteRepo
from manager_core.postgres.scripts import PostgresScriptRepo
from manager_core.postgres.storage import PostgresStorageRepo
from manager_core.postgres.triggers import PostgresTriggerRepo
from manager_core.postgres.users import PostgresUserRepo
from manager_core.retention import ExecutionRetention
from manager_core.storage import StorageCompactor, StorageQuota
from orchestrator_core.inbox import InboxRegistry
from orchestrator_core.route_cache import CachedRouteTable
from orchestrator_core.routes import UserRouteOrchestrator
from picloud.settings import Settings
from picloud_shared.gate import ExecutionGate
from picloud_shared.ids import AppId
from picloud_shared.ports import (
    EventEmitter,
    Executor,
    HostApi,
    InboxResolver,
    OutboxRepo,
    OutboxWriter,
    RouteTable,
    TriggerRepo,
)
from picloud_shared.principals import Principal


def default_node_id() -> str:
    """``host-pid-random``: the random part keeps two nodes apart whose host name and
    pid coincide (containers started with one host name, each its own pid 1). A node
    runs only the sync rows written with its own id: with a shared one, a node could
    take another's, and that one's caller would wait for an answer given elsewhere."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


@attrs.define
class Services:
    """Everything one node runs, built by :func:`build_services`."""

    settings: Settings
    engine: AsyncEngine
    pool: AsyncConnectionPool
    node_id: str
    signal: OutboxSignal
    users: PostgresUserRepo
    apps: PostgresAppRepo
    scripts: PostgresScriptRepo
    routes: PostgresRouteRepo
    triggers: PostgresTriggerRepo
    kv: PostgresKvRepo
    docs: PostgresDocumentRepo
    executions: PostgresExecutionRepo
    dead_letters: PostgresDeadLetterRepo
    outbox: PostgresOutboxRepo
    outbox_repo: OutboxRepo
    outbox_writer: OutboxWriter
    emitter: OutboxEventEmitter
    executor: ProcessExecutor
    gate: ExecutionGate
    inbox: InboxRegistry
    dispatcher: Dispatcher
    orchestrator: UserRouteOrchestrator
    retention: ExecutionRetention | None  # None: records are kept for ever
    quota: StorageQuota
    compactor: StorageCompactor
    backlog: OutboxBacklog


def build_services(
    settings: Settings, database_url: str, *, node_id: str | None = None
) -> Services:
    """Wire a node. Nothing is started: see :func:`running`."""
    node = node_id or default_node_id()
    engine = make_engine(
        database_url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.max_concurrent_executions + 4,
    )
    signal = OutboxSignal()
    triggers = PostgresTriggerRepo(engine)
    trigger_repo: TriggerRepo = triggers
    emitter = OutboxEventEmitter(triggers, signal)
    event_emitter: EventEmitter = emitter
    storage = PostgresStorageRepo(engine)
    quota = StorageQuota(storage, settings.app_storage_quota_bytes)
    kv = PostgresKvRepo(engine, event_emitter, quota)
    docs = PostgresDocumentRepo(engine, event_emitter, quota)
    pool = make_pool(database_url, max_size=settings.db_outbox_pool_size)
    outbox = PostgresOutboxRepo(engine, signal, pool=pool)
    outbox_repo: OutboxRepo = outbox
    outbox_writer: OutboxWriter = outbox
    executor = ProcessExecutor(
        settings.executor_max_workers,
        max_executions_per_worker=settings.executor_max_executions_per_worker,
        idle_ttl=float(settings.executor_idle_ttl_seconds),
    )
    executor_port: Executor = executor
    # One app's sync requests hold at most the gate slots it could run on workers
    # (all but one worker: the pool's share), and never the whole gate.
    capacity = settings.max_concurrent_executions
    gate = ExecutionGate(capacity, owner_share=min(capacity, settings.executor_max_workers) - 1)
    inbox = InboxRegistry()
    inbox_resolver: InboxResolver = inbox
    routes = PostgresRouteRepo(engine)
    scripts = PostgresScriptRepo(engine, quota)
    route_cache = CachedRouteTable(routes)
    # What this node's admin API changes, its own user routes see at once (other
    # nodes within the cache's ttl).
    apps = PostgresAppRepo(engine)
    for repo in (apps, routes, scripts):
        repo.changed.append(route_cache.invalidate)
    route_table: RouteTable = route_cache
    executions = PostgresExecutionRepo(engine)
    dead_letters = PostgresDeadLetterRepo(engine, outbox, event_emitter)

    def host_factory(
        conn: AsyncConnection, app_id: AppId, principal: Principal, depth: int
    ) -> HostApi:
        return PostgresHostApi(conn, app_id, principal, depth, kv, docs)

    dispatcher = Dispatcher(
        engine=engine,
        executor=executor_port,
        gate=gate,
        inbox=inbox_resolver,
        host_factory=host_factory,
        executions=executions,
        dead_letters=dead_letters,
        outbox=outbox,
        signal=signal,
        settings=DispatcherSettings(
            node_id=node,
            poll_interval=settings.dispatch_poll_interval_ms / 1000,
            batch_size=settings.dispatch_batch_size,
            lease_seconds=settings.lease_seconds,
            max_trigger_depth=settings.max_trigger_depth,
        ),
    )
    backlog = OutboxBacklog(engine, settings.max_queued_executions_per_app)
    orchestrator = UserRouteOrchestrator(
        route_table,
        outbox_writer,
        inbox,
        gate,
        node_id=node,
        admission_wait_seconds=settings.sync_admission_wait_ms / 1000,
        backlog=backlog,
    )
    _ = trigger_repo
    return Services(
        settings=settings,
        engine=engine,
        pool=pool,
        node_id=node,
        signal=signal,
        users=PostgresUserRepo(engine),
        apps=apps,
        scripts=scripts,
        routes=routes,
        triggers=triggers,
        kv=kv,
        docs=docs,
        executions=executions,
        dead_letters=dead_letters,
        outbox=outbox,
        outbox_repo=outbox_repo,
        outbox_writer=outbox_writer,
        emitter=emitter,
        executor=executor,
        gate=gate,
        inbox=inbox,
        dispatcher=dispatcher,
        orchestrator=orchestrator,
        retention=(
            ExecutionRetention(
                executions,
                timedelta(days=settings.execution_retention_days),
                dead_letters=dead_letters,
            )
            if settings.execution_retention_days
            else None
        ),
        quota=quota,
        compactor=StorageCompactor(storage),
        backlog=backlog,
    )


@asynccontextmanager
async def running(services: Services) -> AsyncIterator[Services]:
    """Open the outbox pool, start the executor, the dispatcher, the retention task,
    the storage compactor and the backlog counter; on exit drain and stop them, in
    order.

    Once started, everything alive (modules, the schema, the pools, the caches) lives
    as long as the node: it is moved out of the cyclic garbage collector's sight
    (``gc.freeze``), whose full passes otherwise scanned all of it again and again
    (~80 ms each under load); it is given back on stop."""
    await services.pool.open(wait=True)
    try:
        async with services.executor, anyio.create_task_group() as tg:
            await tg.start(services.dispatcher.run)
            if services.retention is not None:
                await tg.start(services.retention.run)
            await tg.start(services.compactor.run)
            await tg.start(services.backlog.run)
            gc.collect()
            gc.freeze()
            try:
                yield services
            finally:
                gc.unfreeze()
                services.dispatcher.stop()
                if services.retention is not None:
                    services.retention.stop()
                services.compactor.stop()
                services.backlog.stop()
    finally:
        with anyio.CancelScope(shield=True):
            await services.pool.close()
            await services.engine.dispose()
