"""Scripts: the code an app runs, versioned on every update.

Limits (API.md): source at most 256 KiB of UTF-8 (``PayloadTooLarge``),
``timeout_seconds`` 1-300 and ``memory_limit_mb`` 16-2048 (``LimitExceeded``).
A script still used by a route or trigger cannot be deleted (``Conflict``; the
schema's ``ON DELETE RESTRICT`` enforces it).

An app holds at most ``MAX_SCRIPTS_PER_APP`` scripts (``LimitExceeded``; creates are
serialised per app, so concurrent ones cannot pass it). A script's source counts in
its app's storage (:mod:`manager_core.postgres.storage`): given a ``quota``, a create,
or an update growing the source, that would take the app past it raises
``StorageQuotaExceeded``, checked as KV and document writes are
(:mod:`manager_core.storage`); a delete or a shrinking update always passes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime

import attrs
from sqlalchemy import ColumnElement, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from manager_core import tables as t
from manager_core.db import (
    FOREIGN_KEY_VIOLATION,
    in_transaction,
    sqlstate,
    transaction,
    translate_integrity_error,
)
from manager_core.postgres._quota import check_quota
from manager_core.postgres._rows import SCRIPT_COLUMNS, script_from_row
from manager_core.storage import StorageQuota
from picloud_shared.domain import Script, check_script_name
from picloud_shared.errors import Conflict, InvalidInput, LimitExceeded, NotFound, PayloadTooLarge
from picloud_shared.ids import AppId, ScriptId
from picloud_shared.limits import (
    DEFAULT_MEMORY_LIMIT_MB,
    DEFAULT_TIMEOUT_SECONDS,
    MAX_MEMORY_LIMIT_MB,
    MAX_SCRIPT_SOURCE_BYTES,
    MAX_SCRIPTS_PER_APP,
    MAX_TIMEOUT_SECONDS,
    MIN_MEMORY_LIMIT_MB,
    MIN_TIMEOUT_SECONDS,
)
from picloud_shared.principals import DATA_CAPABILITIES, Capability

_USERS_SHOWN = 5  # routes and triggers a delete's Conflict names

# ON DELETE RESTRICT reports restrict_violation, not foreign_key_violation.
RESTRICT_VIOLATION = "23001"


@attrs.frozen
class ScriptSummary:
    """A script without its source: what listings show."""

    id: ScriptId
    app_id: AppId
    name: str
    version: int
    timeout_seconds: int
    memory_limit_mb: int
    updated_at: datetime
    data_capabilities: frozenset[Capability]


def check_source(source: object) -> str:
    """Return ``source`` if it is storable, else raise ``InvalidInput``/``PayloadTooLarge``."""
    if not isinstance(source, str):
        raise InvalidInput("source must be a string")
    if "\x00" in source:
        raise InvalidInput("source must not contain NUL characters")
    if len(source.encode("utf-8", "surrogatepass")) > MAX_SCRIPT_SOURCE_BYTES:
        raise PayloadTooLarge(f"script source is limited to {MAX_SCRIPT_SOURCE_BYTES} bytes")
    return source


def source_bytes(source: str) -> int:
    """What a source counts in its app's storage: its UTF-8 bytes (PostgreSQL's
    ``octet_length(source)``)."""
    return len(source.encode("utf-8", "surrogatepass"))


def _check_room(quota: StorageQuota | None, app_id: AppId, adds: int, budget: int | None) -> None:
    """Raise ``StorageQuotaExceeded`` when ``budget`` does not allow ``adds`` bytes."""
    if quota is not None and quota.refused(adds, budget):
        assert budget is not None
        raise quota.exceeded(app_id, adds, budget)


def check_timeout_seconds(value: int) -> int:
    """Return ``value`` if it is within 1-300, else raise ``LimitExceeded``."""
    if not MIN_TIMEOUT_SECONDS <= value <= MAX_TIMEOUT_SECONDS:
        raise LimitExceeded(
            f"timeout_seconds must be between {MIN_TIMEOUT_SECONDS} and {MAX_TIMEOUT_SECONDS}"
        )
    return value


def check_memory_limit_mb(value: int) -> int:
    """Return ``value`` if it is within 16-2048, else raise ``LimitExceeded``."""
    if not MIN_MEMORY_LIMIT_MB <= value <= MAX_MEMORY_LIMIT_MB:
        raise LimitExceeded(
            f"memory_limit_mb must be between {MIN_MEMORY_LIMIT_MB} and {MAX_MEMORY_LIMIT_MB}"
        )
    return value


def _data_column(capabilities: frozenset[Capability]) -> list[str]:
    """The ``data_capabilities`` column: the data capabilities among ``capabilities``."""
    return sorted(c.value for c in capabilities & DATA_CAPABILITIES)


def _by_name(app_id: AppId, name: str) -> ColumnElement[bool]:
    return (t.scripts.c.app_id == app_id) & (t.scripts.c.name == name)


class PostgresScriptRepo:
    """Scripts on PostgreSQL."""

    def __init__(self, engine: AsyncEngine, quota: StorageQuota | None = None) -> None:
        self._engine = engine
        # The storage quota script sources count against (``None``: not checked), the
        # one the app's KV and document repos hold.
        self.quota = quota
        # Called after a script is updated: its routes' cached targets carry its
        # timeout (the sync wait), so a cache of them forgets them at once.
        self.changed: list[Callable[[], None]] = []

    async def create(
        self,
        app_id: AppId,
        name: str,
        source: str,
        *,
        timeout_seconds: int = DEFAULT_TIMEOUT_SECONDS,
        memory_limit_mb: int = DEFAULT_MEMORY_LIMIT_MB,
        data_capabilities: frozenset[Capability] = DATA_CAPABILITIES,
        conn: AsyncConnection | None = None,
    ) -> Script:
        """Create version 1 of a script. ``data_capabilities``: those its author holds
        (see ``Script.data_capabilities``); its source counts against the repo's
        ``quota``. Raises ``InvalidName``,
        ``InvalidInput``, ``PayloadTooLarge``, ``LimitExceeded`` (also: the app holds
        ``MAX_SCRIPTS_PER_APP``), ``StorageQuotaExceeded``, ``Conflict`` (name taken)
        or ``NotFound`` (no such app)."""
        check_script_name(name)
        check_source(source)
        check_timeout_seconds(timeout_seconds)
        check_memory_limit_mb(memory_limit_mb)
        size = source_bytes(source)
        quota = self.quota
        budget = None if quota is None else await quota.budget(app_id, None)
        _check_room(quota, app_id, size, budget)
        stmt = (
            insert(t.scripts)
            .values(
                app_id=app_id,
                name=name,
                source=source,
                timeout_seconds=timeout_seconds,
                memory_limit_mb=memory_limit_mb,
                data_capabilities=_data_column(data_capabilities),
            )
            .returning(*SCRIPT_COLUMNS)
        )
        try:
            async with transaction(conn or self._engine) as c:
                # The app row is locked from here on: concurrent creates check in turn.
                await check_quota(c, t.scripts, app_id, MAX_SCRIPTS_PER_APP, "scripts")
                row = (await c.execute(stmt)).one()
        except IntegrityError as exc:
            if sqlstate(exc) == FOREIGN_KEY_VIOLATION:
                raise NotFound("no such app") from exc
            err = translate_integrity_error(exc, what="script")
            if isinstance(err, Conflict):
                raise Conflict(f"a script named {name!r} already exists") from exc
            raise err from exc
        if quota is not None:
            quota.wrote(app_id, size, None, committed=conn is None)
        return script_from_row(row)

    async def update(
        self,
        app_id: AppId,
        name: str,
        *,
        source: str | None = None,
        timeout_seconds: int | None = None,
        memory_limit_mb: int | None = None,
        data_capabilities: frozenset[Capability] | None = None,
        conn: AsyncConnection | None = None,
    ) -> Script:
        """Replace the given fields, keep the others, and bump ``version``.
        ``data_capabilities``: those of the user saving it (``None``: unchanged); the
        ``quota`` is checked as for :meth:`create`, against the source's growth.
        Raises ``NotFound`` when the script does not exist, or the checks of
        :meth:`create`."""
        values: dict[str, object] = {
            "version": t.scripts.c.version + 1,
            "updated_at": func.now(),
        }
        if source is not None:
            values["source"] = check_source(source)
        if timeout_seconds is not None:
            values["timeout_seconds"] = check_timeout_seconds(timeout_seconds)
        if memory_limit_mb is not None:
            values["memory_limit_mb"] = check_memory_limit_mb(memory_limit_mb)
        if data_capabilities is not None:
            values["data_capabilities"] = _data_column(data_capabilities)
        stmt = update(t.scripts).where(_by_name(app_id, name)).values(values)
        quota = self.quota
        budget, grows = None, 0
        if quota is not None and source is not None:
            budget = await quota.budget(app_id, None)
        async with transaction(conn or self._engine) as c:
            if quota is not None and source is not None:
                # The old size under the row's lock: a concurrent update waits for it.
                old = await c.scalar(
                    select(func.octet_length(t.scripts.c.source))
                    .where(_by_name(app_id, name))
                    .with_for_update()
                )
                if old is None:
                    raise NotFound(f"no script named {name!r}")
                grows = source_bytes(source) - old
                _check_room(quota, app_id, grows, budget)
            row = (await c.execute(stmt.returning(*SCRIPT_COLUMNS))).one_or_none()
        if row is None:
            raise NotFound(f"no script named {name!r}")
        if quota is not None:
            quota.wrote(app_id, grows, None, committed=conn is None)
        for callback in self.changed:
            callback()
        return script_from_row(row)

    async def get(
        self, app_id: AppId, name: str, *, conn: AsyncConnection | None = None
    ) -> Script | None:
        """The app's script named ``name``, or ``None``."""
        async with transaction(conn or self._engine) as c:
            row = (
                await c.execute(select(*SCRIPT_COLUMNS).where(_by_name(app_id, name)))
            ).one_or_none()
        return None if row is None else script_from_row(row)

    async def get_by_id(
        self, app_id: AppId, script_id: ScriptId, *, conn: AsyncConnection | None = None
    ) -> Script | None:
        """The app's script with id ``script_id``, or ``None`` (also for another app's)."""
        stmt = select(*SCRIPT_COLUMNS).where(
            (t.scripts.c.app_id == app_id) & (t.scripts.c.id == script_id)
        )
        async with transaction(conn or self._engine) as c:
            row = (await c.execute(stmt)).one_or_none()
        return None if row is None else script_from_row(row)

    async def list(
        self,
        app_id: AppId,
        *,
        limit: int = 100,
        after: str | None = None,
        conn: AsyncConnection | None = None,
    ) -> Sequence[ScriptSummary]:
        """The app's scripts (without source) in name order, after the name ``after``."""
        stmt = (
            select(
                t.scripts.c.id,
                t.scripts.c.app_id,
                t.scripts.c.name,
                t.scripts.c.version,
                t.scripts.c.timeout_seconds,
                t.scripts.c.memory_limit_mb,
                t.scripts.c.updated_at,
                t.scripts.c.data_capabilities,
            )
            .where(t.scripts.c.app_id == app_id)
            .order_by(t.scripts.c.name)
            .limit(limit)
        )
        if after is not None:
            stmt = stmt.where(t.scripts.c.name > after)
        async with transaction(conn or self._engine) as c:
            rows = (await c.execute(stmt)).all()
        return [
            ScriptSummary(
                id=ScriptId(r.id),
                app_id=AppId(r.app_id),
                name=r.name,
                version=r.version,
                timeout_seconds=r.timeout_seconds,
                memory_limit_mb=r.memory_limit_mb,
                updated_at=r.updated_at,
                data_capabilities=Capability.parse_all(r.data_capabilities),
            )
            for r in rows
        ]

    async def _users_of(self, app_id: AppId, name: str) -> str:
        """The routes and triggers using the script, for a person: ``route GET /x,
        kv trigger <id>`` (the first few, and how many more)."""
        script = select(t.scripts.c.id).where(_by_name(app_id, name)).scalar_subquery()
        routes = select(t.routes.c.method, t.routes.c.path).where(
            t.routes.c.app_id == app_id, t.routes.c.script_id == script
        )
        triggers = select(t.triggers.c.kind, t.triggers.c.id).where(
            t.triggers.c.app_id == app_id, t.triggers.c.script_id == script
        )
        async with self._engine.connect() as c:
            found = [f"route {m} {p}" for m, p in await c.execute(routes.order_by("path"))]
            found += [f"{k} trigger {i}" for k, i in await c.execute(triggers.order_by("id"))]
        shown = ", ".join(found[:_USERS_SHOWN])
        more = len(found) - _USERS_SHOWN
        return shown + (f" and {more} more" if more > 0 else "")

    async def delete(
        self,
        app_id: AppId,
        name: str,
        *,
        conn: AsyncConnection | None = None,
    ) -> bool:
        """Delete a script; ``True`` if it existed (the ``quota`` is told at once that
        its bytes are free). Raises ``Conflict`` while a route or trigger still uses it."""

        async def body(c: AsyncConnection) -> int | None:
            gone = delete(t.scripts).where(_by_name(app_id, name))
            return await c.scalar(gone.returning(func.octet_length(t.scripts.c.source)))

        try:
            size = await in_transaction(conn or self._engine, body)
        except IntegrityError as exc:
            if sqlstate(exc) in (FOREIGN_KEY_VIOLATION, RESTRICT_VIOLATION):
                # The failed transaction is gone; a caller's own one cannot be asked.
                users = "" if conn is not None else await self._users_of(app_id, name)
                raise Conflict(
                    f"script {name!r} is still used by {users or 'a route or trigger'};"
                    " delete them, or PATCH them to another script, first"
                ) from exc
            raise translate_integrity_error(exc, what="script") from exc
        if size is not None and self.quota is not None:
            self.quota.wrote(app_id, -size, None, committed=conn is None)
        return size is not None
