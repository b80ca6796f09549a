"""Apps and their members (``app_members.capabilities``).

Visibility rule used by listing and by :meth:`PostgresAppRepo.principal_for`:
an instance admin sees every app and holds every capability in it; any other
user sees the apps they are a member of, with the capabilities stored there.
A member row always holds at least one capability (setting none removes it).

An app never loses its last member who can manage members: a change that would
take ``app_manage_members`` from them is refused (``Conflict``), so an app cannot be
left with nobody but an instance admin able to fix its membership.

A user who is not an instance admin may have at most ``MAX_APPS_PER_USER`` apps they
created (``apps.created_by``) at a time (``LimitExceeded``): each app has its own
storage quota, and without a cap one token would multiply it at will.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs
from sqlalchemy import Row, Select, any_, delete, exists, insert, literal, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
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
from manager_core.postgres._quota import check_apps_created, lock_app
from manager_core.postgres._rows import (
    APP_COLUMNS,
    app_from_row,
    capabilities_from_column,
    capabilities_to_column,
)
from picloud_shared.domain import App, check_app_name
from picloud_shared.errors import Conflict, NotFound
from picloud_shared.ids import AppId, UserId
from picloud_shared.limits import MAX_APPS_PER_USER, MAX_LIST_FETCH
from picloud_shared.principals import ALL_CAPABILITIES, Capability, Principal

# An admin delete can wait: it runs again more often than other transactions do.
DELETE_ATTEMPTS = 10


@attrs.frozen
class Member:
    """A user's membership of an app: what they may do in it."""

    user_id: UserId
    name: str
    capabilities: frozenset[Capability]


class PostgresAppRepo:
    """Apps and app members on PostgreSQL."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        # Called after a delete removed an app's routes, and after it removed the app:
        # a cache of routes on this node (the orchestrator's) forgets them at once.
        self.changed: list[Callable[[], None]] = []

    async def create(
        self, name: str, created_by: UserId, *, conn: AsyncConnection | None = None
    ) -> App:
        """Create an app; its creator becomes a member holding every capability.

        Raises ``InvalidName``, ``Conflict`` (name taken), ``NotFound`` (no such user)
        or ``LimitExceeded`` (the user, not an instance admin, already has
        ``MAX_APPS_PER_USER`` apps they created).
        """
        check_app_name(name)
        try:
            async with transaction(conn or self._engine) as c:
                # The user row is locked from here on: their concurrent creates count
                # in turn.
                await check_apps_created(c, created_by, MAX_APPS_PER_USER)
                row = (
                    await c.execute(
                        insert(t.apps)
                        .values(name=name, created_by=created_by)
                        .returning(*APP_COLUMNS)
                    )
                ).one()
                await c.execute(
                    insert(t.app_members).values(
                        app_id=row.id,
                        user_id=created_by,
                        capabilities=capabilities_to_column(ALL_CAPABILITIES),
                    )
                )
        except IntegrityError as exc:
            if sqlstate(exc) == FOREIGN_KEY_VIOLATION:
                raise NotFound("no such user") from exc
            err = translate_integrity_error(exc, what="app")
            if isinstance(err, Conflict):
                raise Conflict(f"app name {name!r} is taken") from exc
            raise err from exc
        return app_from_row(row)

    async def get(self, app_id: AppId, *, conn: AsyncConnection | None = None) -> App | None:
        """One app by id, or ``None``."""
        async with transaction(conn or self._engine) as c:
            row = (await c.execute(select(*APP_COLUMNS).where(t.apps.c.id == app_id))).one_or_none()
        return None if row is None else app_from_row(row)

    async def get_by_name(self, name: str, *, conn: AsyncConnection | None = None) -> App | None:
        """One app by name, or ``None``."""
        async with transaction(conn or self._engine) as c:
            row = (await c.execute(select(*APP_COLUMNS).where(t.apps.c.name == name))).one_or_none()
        return None if row is None else app_from_row(row)

    async def list_visible(
        self,
        user_id: UserId,
        *,
        instance_admin: bool,
        capability: Capability | None = None,
        limit: int = 100,
        after: str | None = None,
        conn: AsyncConnection | None = None,
    ) -> Sequence[App]:
        """Apps the user may see, in name order, starting after the name ``after``.

        An instance admin sees all apps; anyone else the apps they are a member
        of (holding ``capability`` when given).
        """
        stmt = select(*APP_COLUMNS).order_by(t.apps.c.name).limit(limit)
        if after is not None:
            stmt = stmt.where(t.apps.c.name > after)
        if not instance_admin:
            member = (t.app_members.c.app_id == t.apps.c.id) & (t.app_members.c.user_id == user_id)
            if capability is not None:
                member &= t.app_members.c.capabilities.contains([str(capability)])
            stmt = stmt.where(exists().where(member))
        async with transaction(conn or self._engine) as c:
            rows = (await c.execute(stmt)).all()
        return [app_from_row(r) for r in rows]

    async def delete(self, app_id: AppId, *, conn: AsyncConnection | None = None) -> bool:
        """Delete an app and everything it owns; ``True`` if it existed.

        In its own transactions, in two steps. First the app's routes and triggers,
        so that no new execution of it starts: requests find no route, and writes
        fan out to no trigger. Then the app, cascading to everything else; its
        executions still running end soon, because nothing feeds them any more. In
        one step, under traffic, the delete kept deadlocking with those executions:
        they hold their own rows and then want the app row for the rows they fan out.
        Each step is re-run on a conflict (``in_transaction``). A delete that still
        fails (503 ``busy``) may have done its first step: repeat it.
        """

        async def stop_new_work(c: AsyncConnection) -> None:
            # Routes and triggers refer to scripts ON DELETE RESTRICT; removing them
            # first also keeps the cascade from apps from tripping over that order.
            await c.execute(delete(t.routes).where(t.routes.c.app_id == app_id))
            await c.execute(delete(t.triggers).where(t.triggers.c.app_id == app_id))

        async def delete_app(c: AsyncConnection) -> bool:
            # The app row first: writers take a key-share lock on it (their rows'
            # foreign key) and now wait for this delete instead of deadlocking with it.
            await c.execute(select(t.apps.c.id).where(t.apps.c.id == app_id).with_for_update())
            await stop_new_work(c)  # any created between the two steps
            result = await c.execute(delete(t.apps).where(t.apps.c.id == app_id))
            return result.rowcount > 0

        if conn is None:
            await in_transaction(self._engine, stop_new_work, attempts=DELETE_ATTEMPTS)
            self._tell_changed()
        deleted = await in_transaction(conn or self._engine, delete_app, attempts=DELETE_ATTEMPTS)
        self._tell_changed()
        return deleted

    def _tell_changed(self) -> None:
        for callback in self.changed:
            callback()

    # -- members ----------------------------------------------------------------------

    async def set_capabilities(
        self,
        app_id: AppId,
        user_id: UserId,
        capabilities: Iterable[Capability],
        *,
        conn: AsyncConnection | None = None,
    ) -> frozenset[Capability]:
        """Set what ``user_id`` may do in the app; an empty set removes the member.

        Returns the stored set. Raises ``NotFound`` when the app or user does not exist.
        """
        caps = frozenset(Capability(c) for c in capabilities)
        try:
            async with transaction(conn or self._engine) as c:
                # One member change of an app at a time (two managers demoting each
                # other at once must not both succeed), then the last-manager rule.
                await lock_app(c, app_id)
                if Capability.APP_MANAGE_MEMBERS not in caps:
                    await self._keep_a_manager(c, app_id, user_id)
                if not caps:
                    await c.execute(
                        delete(t.app_members).where(
                            (t.app_members.c.app_id == app_id)
                            & (t.app_members.c.user_id == user_id)
                        )
                    )
                    if not await self._app_and_user_exist(c, app_id, user_id):
                        raise NotFound("no such app or user")
                    return caps
                stmt = pg_insert(t.app_members).values(
                    app_id=app_id, user_id=user_id, capabilities=capabilities_to_column(caps)
                )
                stmt = stmt.on_conflict_do_update(
                    index_elements=[t.app_members.c.app_id, t.app_members.c.user_id],
                    set_={"capabilities": stmt.excluded.capabilities},
                )
                await c.execute(stmt)
        except IntegrityError as exc:
            if sqlstate(exc) == FOREIGN_KEY_VIOLATION:
                raise NotFound("no such app or user") from exc
            raise translate_integrity_error(exc, what="member") from exc
        return caps

    async def list_members(
        self,
        app_id: AppId,
        *,
        limit: int = 100,
        after: str | None = None,
        conn: AsyncConnection | None = None,
    ) -> Sequence[Member]:
        """The app's members in user-name order, starting after the name ``after``
        (at most ``MAX_LIST_FETCH``). Instance admins who are not members are not
        listed."""
        stmt = (
            self._members(app_id).order_by(t.users.c.name).limit(max(0, min(limit, MAX_LIST_FETCH)))
        )
        if after is not None:
            stmt = stmt.where(t.users.c.name > after)
        async with transaction(conn or self._engine) as c:
            rows = (await c.execute(stmt)).all()
        return [_member(r) for r in rows]

    async def get_member(
        self, app_id: AppId, user_id: UserId, *, conn: AsyncConnection | None = None
    ) -> Member | None:
        """One member of the app, or ``None`` when the user is not one."""
        stmt = self._members(app_id).where(t.app_members.c.user_id == user_id)
        async with transaction(conn or self._engine) as c:
            row = (await c.execute(stmt)).one_or_none()
        return None if row is None else _member(row)

    @staticmethod
    def _members(app_id: AppId) -> Select[Any]:
        return (
            select(t.app_members.c.user_id, t.users.c.name, t.app_members.c.capabilities)
            .select_from(t.app_members.join(t.users, t.users.c.id == t.app_members.c.user_id))
            .where(t.app_members.c.app_id == app_id)
        )

    async def capabilities_of(
        self, app_id: AppId, user_id: UserId, *, conn: AsyncConnection | None = None
    ) -> frozenset[Capability] | None:
        """What the member holds in the app, or ``None`` when they are not a member."""
        stmt = select(t.app_members.c.capabilities).where(
            (t.app_members.c.app_id == app_id) & (t.app_members.c.user_id == user_id)
        )
        async with transaction(conn or self._engine) as c:
            row = (await c.execute(stmt)).one_or_none()
        return None if row is None else capabilities_from_column(row.capabilities)

    async def principal_for(
        self, app_id: AppId, user_id: UserId, *, conn: AsyncConnection | None = None
    ) -> Principal | None:
        """The user acting in the app, or ``None`` when the app or the user does not
        exist, or the user is neither a member nor an instance admin. One query."""
        stmt = (
            select(t.users.c.is_instance_admin, t.app_members.c.capabilities)
            .select_from(
                t.users.join(t.apps, t.apps.c.id == app_id).outerjoin(
                    t.app_members,
                    (t.app_members.c.app_id == t.apps.c.id)
                    & (t.app_members.c.user_id == t.users.c.id),
                )
            )
            .where(t.users.c.id == user_id)
        )
        async with transaction(conn or self._engine) as c:
            row = (await c.execute(stmt)).one_or_none()
        if row is None:
            return None
        if row.is_instance_admin:
            return Principal(user_id, app_id, ALL_CAPABILITIES, is_instance_admin=True)
        if row.capabilities is None:
            return None
        return Principal(user_id, app_id, capabilities_from_column(row.capabilities))

    @staticmethod
    async def _keep_a_manager(c: AsyncConnection, app_id: AppId, user_id: UserId) -> None:
        """Refuse to take ``app_manage_members`` from ``user_id`` when no other member
        of the app holds it."""
        holds = literal(Capability.APP_MANAGE_MEMBERS.value) == any_(t.app_members.c.capabilities)
        members = t.app_members.c.app_id == app_id
        is_manager = await c.scalar(
            select(exists().where(members & (t.app_members.c.user_id == user_id) & holds))
        )
        if not is_manager:
            return
        other = await c.scalar(
            select(exists().where(members & (t.app_members.c.user_id != user_id) & holds))
        )
        if not other:
            raise Conflict(
                "the app would be left without a member holding app_manage_members; "
                "give it to another member first"
            )

    @staticmethod
    async def _app_and_user_exist(c: AsyncConnection, app_id: AppId, user_id: UserId) -> bool:
        stmt = select(
            exists().where(t.apps.c.id == app_id) & exists().where(t.users.c.id == user_id)
        )
        return bool(await c.scalar(stmt))


def _member(row: Row[Any]) -> Member:
    return Member(UserId(row.user_id), row.name, capabilities_from_column(row.capabilities))


__all__ = ["Member", "PostgresAppRepo"]
