"""What the admin API needs, handed in by the composition root."""

from __future__ import annotations

import attrs
from sqlalchemy.ext.asyncio import AsyncEngine

from manager_core.api._endpoint import refusal_log
from manager_core.auth import Authenticator
from manager_core.outage_log import OutageLog
from manager_core.outbox_event_emitter import OutboxEventEmitter
from manager_core.postgres.apps import PostgresAppRepo
from manager_core.postgres.dead_letters import PostgresDeadLetterRepo
from manager_core.postgres.documents import PostgresDocumentRepo
from manager_core.postgres.executions import PostgresExecutionRepo
from manager_core.postgres.kv import PostgresKvRepo
from manager_core.postgres.outbox import PostgresOutboxRepo
from manager_core.postgres.routes import PostgresRouteRepo
from manager_core.postgres.scripts import PostgresScriptRepo
from manager_core.postgres.triggers import PostgresTriggerRepo
from manager_core.postgres.users import PostgresUserRepo
from manager_core.storage import StorageQuota


@attrs.frozen
class AdminDeps:
    """The repositories behind the admin API.

    ``kv`` and ``documents`` must be built with the node's event emitter so admin
    writes fire triggers exactly as script writes do; ``dead_letters`` with the
    node's outbox repo so a replay wakes the local dispatcher. ``quota`` (the apps'
    storage usage and limit the app resource shows) defaults to the one ``kv``
    enforces.
    """

    users: PostgresUserRepo
    apps: PostgresAppRepo
    scripts: PostgresScriptRepo
    routes: PostgresRouteRepo
    triggers: PostgresTriggerRepo
    kv: PostgresKvRepo
    documents: PostgresDocumentRepo
    executions: PostgresExecutionRepo
    dead_letters: PostgresDeadLetterRepo
    auth: Authenticator = attrs.field(
        default=attrs.Factory(lambda self: Authenticator(self.users, self.apps), takes_self=True)
    )
    quota: StorageQuota = attrs.field(
        default=attrs.Factory(lambda self: self.kv.quota, takes_self=True)
    )
    #: The requests refused while the database is away, and their aggregated log.
    refusals: OutageLog = attrs.field(factory=refusal_log)

    @classmethod
    def from_engine(
        cls,
        engine: AsyncEngine,
        *,
        outbox: PostgresOutboxRepo | None = None,
        quota: StorageQuota | None = None,
    ) -> AdminDeps:
        """Every dependency built on one engine. Pass the node's ``outbox`` (the one
        its dispatcher waits on); by default a private one is made. ``quota``: the
        apps' storage quota (default: unlimited)."""
        outbox = outbox if outbox is not None else PostgresOutboxRepo(engine)
        triggers = PostgresTriggerRepo(engine)
        emitter = OutboxEventEmitter(triggers, outbox.signal)
        kv = PostgresKvRepo(engine, emitter, quota)
        return cls(
            users=PostgresUserRepo(engine),
            apps=PostgresAppRepo(engine),
            scripts=PostgresScriptRepo(engine, kv.quota),
            routes=PostgresRouteRepo(engine),
            triggers=triggers,
            kv=kv,
            documents=PostgresDocumentRepo(engine, emitter, quota),
            executions=PostgresExecutionRepo(engine),
            dead_letters=PostgresDeadLetterRepo(engine, outbox, emitter),
        )
