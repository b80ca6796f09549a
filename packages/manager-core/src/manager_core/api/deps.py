"""What the admin API needs, handed in by the composition root."""

from __future__ import annotations

import attrs
from sqlalchemy.ext.asyncio import AsyncEngine

from manager_core.auth import Authenticator
from manager_core.postgres.apps import PostgresAppRepo
from manager_core.postgres.routes import PostgresRouteRepo
from manager_core.postgres.scripts import PostgresScriptRepo
from manager_core.postgres.users import PostgresUserRepo


@attrs.frozen
class AdminDeps:
    """The repositories behind the admin API.

    Further ports (KV, documents, triggers, executions, dead letters, the event
    emitter) join as further fields; ``from_engine`` builds them all.
    """

    users: PostgresUserRepo
    apps: PostgresAppRepo
    scripts: PostgresScriptRepo
    routes: PostgresRouteRepo
    auth: Authenticator = attrs.field(
        default=attrs.Factory(lambda self: Authenticator(self.users, self.apps), takes_self=True)
    )

    @classmethod
    def from_engine(cls, engine: AsyncEngine) -> AdminDeps:
        """Every dependency built on one engine."""
        return cls(
            users=PostgresUserRepo(engine),
            apps=PostgresAppRepo(engine),
            scripts=PostgresScriptRepo(engine),
            routes=PostgresRouteRepo(engine),
        )
