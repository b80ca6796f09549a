"""Row ↔ domain mapping for the identity and configuration tables.

Each ``*_from_row`` takes a SQLAlchemy ``Row`` (or any object with the table's
column names as attributes) and builds the frozen domain value. Queries select
exactly the columns these helpers read (``*_COLUMNS``).
"""

from __future__ import annotations

from typing import Any

from manager_core import tables as t
from picloud_shared.domain import App, DispatchMode, Route, Script
from picloud_shared.ids import AppId, RouteId, ScriptId, UserId
from picloud_shared.principals import Capability

APP_COLUMNS = (t.apps.c.id, t.apps.c.name, t.apps.c.created_at, t.apps.c.created_by)
SCRIPT_COLUMNS = (
    t.scripts.c.id,
    t.scripts.c.app_id,
    t.scripts.c.name,
    t.scripts.c.source,
    t.scripts.c.version,
    t.scripts.c.timeout_seconds,
    t.scripts.c.memory_limit_mb,
    t.scripts.c.data_capabilities,
)
ROUTE_COLUMNS = (
    t.routes.c.id,
    t.routes.c.app_id,
    t.routes.c.method,
    t.routes.c.path,
    t.routes.c.script_id,
    t.routes.c.dispatch_mode,
    t.routes.c.registered_by,
)


def app_from_row(row: Any) -> App:
    """An :class:`App` from a row of ``APP_COLUMNS``."""
    return App(
        id=AppId(row.id),
        name=row.name,
        created_at=row.created_at,
        created_by=None if row.created_by is None else UserId(row.created_by),
    )


def script_from_row(row: Any) -> Script:
    """A :class:`Script` from a row of ``SCRIPT_COLUMNS``."""
    return Script(
        id=ScriptId(row.id),
        app_id=AppId(row.app_id),
        name=row.name,
        source=row.source,
        version=row.version,
        timeout_seconds=row.timeout_seconds,
        memory_limit_mb=row.memory_limit_mb,
        data_capabilities=Capability.parse_all(row.data_capabilities),
    )


def route_from_row(row: Any) -> Route:
    """A :class:`Route` from a row of ``ROUTE_COLUMNS``."""
    return Route(
        id=RouteId(row.id),
        app_id=AppId(row.app_id),
        method=row.method,
        path=row.path,
        script_id=ScriptId(row.script_id),
        dispatch_mode=DispatchMode(row.dispatch_mode),
        registered_by=None if row.registered_by is None else UserId(row.registered_by),
    )


def capabilities_from_column(values: list[str] | None) -> frozenset[Capability]:
    """Decode an ``app_members.capabilities`` array (the schema's CHECK keeps it valid)."""
    return frozenset(Capability(v) for v in values or ())


def capabilities_to_column(caps: frozenset[Capability] | set[Capability]) -> list[str]:
    """Encode capabilities for ``app_members.capabilities``, sorted for stable storage."""
    return sorted(str(c) for c in caps)
