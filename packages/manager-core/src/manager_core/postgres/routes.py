"""User routes: ``{METHOD} /apps/{app_name}{path}`` bound to a script.

:class:`PostgresRouteRepo` is also the orchestrator's :class:`RouteTable`:
:meth:`~PostgresRouteRepo.routes_for_app` answers one app's routes, with each
script's timeout, in a single query (it runs on every user request).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime

import attrs
from sqlalchemy import Select, delete, insert, literal, select, tuple_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from manager_core import tables as t
from manager_core.db import (
    FOREIGN_KEY_VIOLATION,
    in_transaction,
    sqlstate,
    transaction,
    translate_integrity_error,
    unavailable_as_error,
)
from manager_core.postgres._quota import check_quota
from manager_core.postgres._rows import ROUTE_COLUMNS, route_from_row
from picloud_shared.domain import HTTP_METHODS, DispatchMode, Route, RouteTarget
from picloud_shared.errors import Conflict, InvalidInput, NotFound, UnknownScript
from picloud_shared.ids import AppId, RouteId, ScriptId, UserId
from picloud_shared.limits import MAX_ROUTES_PER_APP
from picloud_shared.route_paths import check_route_path, route_shape


def check_method(method: object) -> str:
    """The upper-cased method if it is one of ``HTTP_METHODS``, else ``InvalidInput``."""
    if not isinstance(method, str) or method.upper() not in HTTP_METHODS:
        allowed = ", ".join(sorted(HTTP_METHODS))
        raise InvalidInput(f"method must be one of {allowed}")
    return method.upper()


@attrs.frozen
class RouteEntry:
    """A route as the admin API shows it: with its script's name."""

    route: Route
    script_name: str
    created_at: datetime


class PostgresRouteRepo:
    """User routes on PostgreSQL; also the orchestrator's ``RouteTable``."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        # Called after a route is created, changed or deleted: a cache of routes on this node
        # (the orchestrator's) forgets them at once instead of at the end of its ttl.
        self.changed: list[Callable[[], None]] = []

    async def create(
        self,
        app_id: AppId,
        method: str,
        path: str,
        script_name: str,
        *,
        dispatch_mode: DispatchMode = DispatchMode.SYNC,
        registered_by: UserId | None = None,
        conn: AsyncConnection | None = None,
    ) -> RouteEntry:
        """Bind ``method path`` to the app's script ``script_name``.

        Raises ``InvalidInput`` (method, path), ``UnknownScript``, ``Conflict`` (a route
        with the same method and path exists, also one whose path differs only in its
        params' names) or ``NotFound`` (no such app).
        """
        method = check_method(method)
        check_route_path(path)
        dispatch_mode = DispatchMode(dispatch_mode)
        source = select(
            literal(app_id).label("app_id"),
            literal(method).label("method"),
            literal(path).label("path"),
            t.scripts.c.id.label("script_id"),
            literal(registered_by, t.routes.c.registered_by.type).label("registered_by"),
            literal(dispatch_mode.value).label("dispatch_mode"),
        ).where((t.scripts.c.app_id == app_id) & (t.scripts.c.name == script_name))
        stmt = (
            insert(t.routes)
            .from_select(
                ["app_id", "method", "path", "script_id", "registered_by", "dispatch_mode"],
                source,
            )
            .returning(*ROUTE_COLUMNS, t.routes.c.created_at)
        )
        try:
            async with transaction(conn or self._engine) as c:
                # The app row is locked from here on: concurrent creates check in turn.
                await check_quota(c, t.routes, app_id, MAX_ROUTES_PER_APP, "routes")
                await _check_no_route_like(c, app_id, method, path)
                row = (await c.execute(stmt)).one_or_none()
        except IntegrityError as exc:
            if sqlstate(exc) == FOREIGN_KEY_VIOLATION:
                raise NotFound("no such app or user") from exc
            err = translate_integrity_error(exc, what="route")
            if isinstance(err, Conflict):
                raise Conflict(f"a route {method} {path} already exists") from exc
            raise err from exc
        if row is None:
            raise UnknownScript(f"no script named {script_name!r} in this app")
        for callback in self.changed:
            callback()
        return RouteEntry(route_from_row(row), script_name, row.created_at)

    async def update(
        self,
        app_id: AppId,
        route_id: RouteId,
        *,
        registered_by: UserId | None,
        script_name: str | None = None,
        dispatch_mode: DispatchMode | None = None,
        conn: AsyncConnection | None = None,
    ) -> RouteEntry | None:
        """Point one of the app's routes at the app's script ``script_name`` and/or
        change its ``dispatch_mode`` (``None``: keep). Its method and path never
        change (another method or path is another route).

        ``registered_by`` always becomes the route's registrant, even when nothing
        else changes: whoever decides what a route runs is whom it runs as (as at
        create). ``None`` when the app has no such route; raises ``UnknownScript``,
        or ``NotFound`` for a user that no longer exists. What is already waiting
        in the outbox keeps the script it was written with.
        """
        values: dict[str, object] = {"registered_by": registered_by}
        if dispatch_mode is not None:
            values["dispatch_mode"] = DispatchMode(dispatch_mode).value
        this_route = (t.routes.c.app_id == app_id) & (t.routes.c.id == route_id)

        async def body(c: AsyncConnection) -> RouteEntry | None:
            locked = select(t.routes.c.id).where(this_route).with_for_update()
            if (await c.execute(locked)).one_or_none() is None:
                return None
            if script_name is not None:
                # KEY SHARE: a concurrent delete of the script waits for this commit
                # (then meets the route's reference) instead of racing it.
                script_id = await c.scalar(
                    select(t.scripts.c.id)
                    .where((t.scripts.c.app_id == app_id) & (t.scripts.c.name == script_name))
                    .with_for_update(key_share=True)
                )
                if script_id is None:
                    raise UnknownScript(f"no script named {script_name!r} in this app")
                values["script_id"] = script_id
            await c.execute(update(t.routes).where(this_route).values(**values))
            row = (await c.execute(self._entries().where(this_route))).one()
            return RouteEntry(route_from_row(row), row.name, row.created_at)

        try:
            entry = await in_transaction(conn or self._engine, body)
        except IntegrityError as exc:
            if sqlstate(exc) == FOREIGN_KEY_VIOLATION:
                raise NotFound("no such app or user") from exc
            raise translate_integrity_error(exc, what="route") from exc
        if entry is not None:
            for callback in self.changed:
                callback()
        return entry

    async def get(
        self, app_id: AppId, route_id: RouteId, *, conn: AsyncConnection | None = None
    ) -> RouteEntry | None:
        """One route of the app, or ``None`` (also for another app's route)."""
        stmt = self._entries().where((t.routes.c.app_id == app_id) & (t.routes.c.id == route_id))
        async with transaction(conn or self._engine) as c:
            row = (await c.execute(stmt)).one_or_none()
        return None if row is None else RouteEntry(route_from_row(row), row.name, row.created_at)

    async def list(
        self,
        app_id: AppId,
        *,
        limit: int = 100,
        after: tuple[str, str] | None = None,
        conn: AsyncConnection | None = None,
    ) -> Sequence[RouteEntry]:
        """The app's routes ordered by (path, method), after the key ``after``."""
        stmt = (
            self._entries()
            .where(t.routes.c.app_id == app_id)
            .order_by(t.routes.c.path, t.routes.c.method)
            .limit(limit)
        )
        if after is not None:
            stmt = stmt.where(tuple_(t.routes.c.path, t.routes.c.method) > tuple_(*after))
        async with transaction(conn or self._engine) as c:
            rows = (await c.execute(stmt)).all()
        return [RouteEntry(route_from_row(r), r.name, r.created_at) for r in rows]

    async def delete(
        self, app_id: AppId, route_id: RouteId, *, conn: AsyncConnection | None = None
    ) -> bool:
        """Delete one of the app's routes; ``True`` if it existed in this app."""
        stmt = delete(t.routes).where((t.routes.c.app_id == app_id) & (t.routes.c.id == route_id))

        async def body(c: AsyncConnection) -> bool:
            return (await c.execute(stmt)).rowcount > 0

        deleted = await in_transaction(conn or self._engine, body)
        if deleted:
            for callback in self.changed:
                callback()
        return deleted

    async def routes_for_app(self, app_name: str) -> Sequence[RouteTarget] | None:
        """Every route of the app named ``app_name`` (``None``: no such app). One query."""
        stmt = (
            select(
                t.apps.c.id.label("app_id"),
                t.apps.c.name.label("app_name"),
                t.routes.c.id.label("route_id"),
                t.routes.c.method,
                t.routes.c.path,
                t.routes.c.dispatch_mode,
                t.routes.c.script_id,
                t.scripts.c.timeout_seconds,
            )
            .select_from(
                t.apps.outerjoin(t.routes, t.routes.c.app_id == t.apps.c.id).outerjoin(
                    t.scripts, t.scripts.c.id == t.routes.c.script_id
                )
            )
            .where(t.apps.c.name == app_name)
            .order_by(t.routes.c.path, t.routes.c.method)
        )
        with unavailable_as_error():
            async with transaction(self._engine) as c:
                rows = (await c.execute(stmt)).all()
        if not rows:
            return None
        return [
            RouteTarget(
                route_id=RouteId(r.route_id),
                app_id=AppId(r.app_id),
                app_name=r.app_name,
                method=r.method,
                path=r.path,
                dispatch_mode=DispatchMode(r.dispatch_mode),
                script_id=ScriptId(r.script_id),
                timeout_seconds=r.timeout_seconds,
            )
            for r in rows
            if r.route_id is not None
        ]

    @staticmethod
    def _entries() -> Select:  # type: ignore[type-arg]
        return select(*ROUTE_COLUMNS, t.routes.c.created_at, t.scripts.c.name).join_from(
            t.routes, t.scripts, t.scripts.c.id == t.routes.c.script_id
        )


async def _check_no_route_like(c: AsyncConnection, app_id: AppId, method: str, path: str) -> None:
    """``Conflict`` when the app has a ``method`` route of ``path``'s shape (call it with
    the app row locked, so that a concurrent create of the same shape waits)."""
    shape = route_shape(path)
    paths = await c.scalars(
        select(t.routes.c.path).where((t.routes.c.app_id == app_id) & (t.routes.c.method == method))
    )
    for taken in paths:
        if route_shape(taken) == shape:
            same = "" if taken == path else " (paths that differ only in param names are the same)"
            raise Conflict(f"a route {method} {taken} already exists{same}")
