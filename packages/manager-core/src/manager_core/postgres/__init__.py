"""PostgreSQL adapters (``Postgres*Repo``), one module per port or aggregate.

This package exports the identity and configuration repos; the data, trigger and
outbox adapters live in their own modules (``kv``, ``documents``, ``triggers``,
``outbox``, ``executions``, ``dead_letters``) and are imported from there.
"""

from __future__ import annotations

from manager_core.postgres.apps import PostgresAppRepo
from manager_core.postgres.routes import PostgresRouteRepo, RouteEntry
from manager_core.postgres.scripts import PostgresScriptRepo, ScriptSummary
from manager_core.postgres.users import PostgresUserRepo, User

__all__ = [
    "PostgresAppRepo",
    "PostgresRouteRepo",
    "PostgresScriptRepo",
    "PostgresUserRepo",
    "RouteEntry",
    "ScriptSummary",
    "User",
]
