"""Users and their bearer tokens.

A token is ``pc_`` + 32 random bytes (urlsafe base64). Only its SHA-256 is
stored; :meth:`PostgresUserRepo.authenticate` looks the hash up through the
unique index on ``users.token_hash`` and compares it in constant time, so
neither the token nor a timing difference on it is ever exposed. Every request
authenticates afresh: a rotated token or a deleted user stops working at once.

Two rules keep the instance manageable, whatever is revoked:

- there is always an instance admin: the last one can be neither deleted nor
  demoted (``Conflict``);
- an app keeps a member holding ``app_manage_members`` (the apps repo's
  last-manager rule): a user who is the only one of some app cannot be deleted
  (``Conflict``, naming the apps) until another member holds it or the app is gone.

Deleting a user removes their memberships; the apps they created stay, and the
routes and triggers they registered stay but no longer run (their executions fail
``principal_revoked``).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence
from datetime import datetime

import attrs
from sqlalchemy import any_, delete, exists, func, insert, literal, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from manager_core import tables as t
from manager_core.db import in_transaction, transaction, translate_integrity_error
from manager_core.postgres._quota import lock_app
from picloud_shared.errors import Conflict, InvalidInput, InvalidName, NotFound
from picloud_shared.ids import AppId, UserId
from picloud_shared.limits import MAX_LIST_FETCH, MIN_TOKEN_CHARS
from picloud_shared.principals import BOOTSTRAP_ADMIN_NAME, Capability

TOKEN_PREFIX = "pc_"
USER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,62}")
# Serialises first-start admin creation across several `picloud serve` processes,
# and every change that could leave no instance admin (delete, demote).
_ADMIN_BOOTSTRAP_LOCK = 0x70C1_0AD1
# A user delete cascades into rows running executions may hold: re-run on a deadlock.
DELETE_ATTEMPTS = 10
# How many apps a refused delete names.
_NAMED_APPS = 5


@attrs.frozen
class User:
    """Someone who can call the admin API."""

    id: UserId
    name: str
    is_instance_admin: bool
    created_at: datetime


def new_token() -> str:
    """A fresh random bearer token."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> bytes:
    """The stored form of a token: its SHA-256 digest."""
    return hashlib.sha256(token.encode("utf-8")).digest()


def check_user_name(name: object) -> str:
    """Return ``name`` if it is a valid user name, else raise :class:`InvalidName`."""
    if not isinstance(name, str) or not USER_NAME_RE.fullmatch(name):
        raise InvalidName(
            "user names are 1-63 characters of A-Z, a-z, 0-9, '_', '.', '@' and '-',"
            " starting with a letter or digit"
        )
    return name


_USER_COLUMNS = (t.users.c.id, t.users.c.name, t.users.c.is_instance_admin, t.users.c.created_at)


def _user(row: object) -> User:
    return User(
        id=UserId(row.id),  # type: ignore[attr-defined]
        name=row.name,  # type: ignore[attr-defined]
        is_instance_admin=row.is_instance_admin,  # type: ignore[attr-defined]
        created_at=row.created_at,  # type: ignore[attr-defined]
    )


class PostgresUserRepo:
    """Users and token authentication on PostgreSQL."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def create_user(
        self,
        name: str,
        instance_admin: bool = False,
        *,
        token: str | None = None,
        conn: AsyncConnection | None = None,
    ) -> tuple[User, str]:
        """Create a user; returns it with its bearer token (shown once, never stored).

        ``token`` defaults to a fresh random one. Raises ``InvalidName``,
        ``InvalidInput`` (the bootstrap admin's name for a user who is no instance
        admin) or ``Conflict`` (name taken).
        """
        check_user_name(name)
        if name == BOOTSTRAP_ADMIN_NAME and not instance_admin:
            raise InvalidInput(
                f"the name {BOOTSTRAP_ADMIN_NAME!r} is the bootstrap instance admin's: "
                "create it as an instance admin, or choose another name"
            )
        token = new_token() if token is None else _check_token(token)
        stmt = (
            insert(t.users)
            .values(name=name, token_hash=hash_token(token), is_instance_admin=instance_admin)
            .returning(*_USER_COLUMNS)
        )
        try:
            async with transaction(conn or self._engine) as c:
                row = (await c.execute(stmt)).one()
        except IntegrityError as exc:
            err = translate_integrity_error(exc, what="user")
            if isinstance(err, Conflict):
                # token_hash collides only for a reused PICLOUD_ADMIN_TOKEN-style token.
                raise Conflict(f"user name {name!r} is taken (or the token is in use)") from exc
            raise err from exc
        return _user(row), token

    async def authenticate(self, token: str, *, conn: AsyncConnection | None = None) -> User | None:
        """The user holding ``token``, or ``None``."""
        if not token:
            return None
        digest = hash_token(token)
        stmt = select(*_USER_COLUMNS, t.users.c.token_hash).where(t.users.c.token_hash == digest)
        async with transaction(conn or self._engine) as c:
            row = (await c.execute(stmt)).one_or_none()
        if row is None or not hmac.compare_digest(bytes(row.token_hash), digest):
            return None
        return _user(row)

    async def get(self, user_id: UserId, *, conn: AsyncConnection | None = None) -> User | None:
        """One user, or ``None``."""
        stmt = select(*_USER_COLUMNS).where(t.users.c.id == user_id)
        async with transaction(conn or self._engine) as c:
            row = (await c.execute(stmt)).one_or_none()
        return None if row is None else _user(row)

    async def get_by_name(self, name: str, *, conn: AsyncConnection | None = None) -> User | None:
        """One user by name, or ``None``."""
        stmt = select(*_USER_COLUMNS).where(t.users.c.name == name)
        async with transaction(conn or self._engine) as c:
            row = (await c.execute(stmt)).one_or_none()
        return None if row is None else _user(row)

    async def list_users(
        self,
        *,
        limit: int = 100,
        after: str | None = None,
        conn: AsyncConnection | None = None,
    ) -> Sequence[User]:
        """Users in name order, starting after the name ``after`` (at most
        ``MAX_LIST_FETCH``)."""
        stmt = select(*_USER_COLUMNS).order_by(t.users.c.name).limit(min(limit, MAX_LIST_FETCH))
        if after is not None:
            stmt = stmt.where(t.users.c.name > after)
        async with transaction(conn or self._engine) as c:
            rows = (await c.execute(stmt)).all()
        return [_user(r) for r in rows]

    async def rotate_token(
        self, user_id: UserId, *, conn: AsyncConnection | None = None
    ) -> tuple[User, str]:
        """Give the user a fresh token (returned, shown once); the old one stops
        working. Raises ``NotFound``."""
        token = new_token()
        stmt = (
            update(t.users)
            .where(t.users.c.id == user_id)
            .values(token_hash=hash_token(token))
            .returning(*_USER_COLUMNS)
        )
        async with transaction(conn or self._engine) as c:
            row = (await c.execute(stmt)).one_or_none()
        if row is None:
            raise NotFound("no such user")
        return _user(row), token

    async def set_instance_admin(
        self, user_id: UserId, instance_admin: bool, *, conn: AsyncConnection | None = None
    ) -> User:
        """Promote or demote the user; returns them as stored.

        Raises ``NotFound``, or ``Conflict`` when it would demote the last instance admin.
        """
        async with transaction(conn or self._engine) as c:
            await _lock_instance_admins(c)
            user = await self._locked(c, user_id)
            if user.is_instance_admin and not instance_admin:
                await _keep_an_instance_admin(c, user)
            row = (
                await c.execute(
                    update(t.users)
                    .where(t.users.c.id == user_id)
                    .values(is_instance_admin=instance_admin)
                    .returning(*_USER_COLUMNS)
                )
            ).one()
        return _user(row)

    async def delete(self, user_id: UserId, *, conn: AsyncConnection | None = None) -> User:
        """Delete the user and their memberships; returns who was deleted. Their token
        stops working; apps they created stay (``created_by`` NULL), and so do routes
        and triggers they registered, whose executions then fail ``principal_revoked``.

        Raises ``NotFound``, or ``Conflict`` when the user is the last instance admin
        or the only member holding ``app_manage_members`` of some app.
        """

        member_of = (
            select(t.app_members.c.app_id)
            .where(t.app_members.c.user_id == user_id)
            .order_by(t.app_members.c.app_id)
        )

        async def body(c: AsyncConnection) -> User:
            await _lock_instance_admins(c)
            # The apps first, in id order, as member changes lock them (lock_app):
            # a concurrent change to who manages them is seen, not raced.
            locked = set((await c.scalars(member_of)).all())
            for app_id in sorted(locked):
                await lock_app(c, AppId(app_id))
            user = await self._locked(c, user_id)
            # With the user's row locked nobody adds them to an app any more; an app
            # they joined since the first read is locked now (a deadlock with that
            # member change is run again, with the app among the first).
            for app_id in (await c.scalars(member_of)).all():
                if app_id not in locked:
                    await lock_app(c, AppId(app_id))
            if user.is_instance_admin:
                await _keep_an_instance_admin(c, user)
            await _keep_app_managers(c, user)
            await c.execute(delete(t.users).where(t.users.c.id == user_id))
            return user

        return await in_transaction(conn or self._engine, body, attempts=DELETE_ATTEMPTS)

    @staticmethod
    async def _locked(c: AsyncConnection, user_id: UserId) -> User:
        stmt = select(*_USER_COLUMNS).where(t.users.c.id == user_id).with_for_update()
        row = (await c.execute(stmt)).one_or_none()
        if row is None:
            raise NotFound("no such user")
        return _user(row)

    async def ensure_instance_admin(
        self, name: str, token: str, *, conn: AsyncConnection | None = None
    ) -> User | None:
        """Create the instance admin ``name`` with ``token`` unless an instance admin
        exists. Returns the new user, or ``None`` when nothing was done.

        Safe to call concurrently from several processes (an advisory lock
        serialises the check and the insert).
        """
        check_user_name(name)
        _check_token(token)
        async with transaction(conn or self._engine) as c:
            await c.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ADMIN_BOOTSTRAP_LOCK}
            )
            existing = await c.scalar(
                select(func.count()).select_from(t.users).where(t.users.c.is_instance_admin)
            )
            if existing:
                return None
            user, _ = await self.create_user(name, True, token=token, conn=c)
        return user

    async def replace_admin_token(
        self, name: str, token: str, *, conn: AsyncConnection | None = None
    ) -> bool:
        """Make ``token`` the bearer token of the instance admin ``name``; its old token
        stops working. ``True`` when the token changed, ``False`` when the admin had it
        already or there is no such instance admin. Raises ``Conflict`` when another
        user holds ``token``."""
        _check_token(token)
        digest = hash_token(token)
        stmt = (
            update(t.users)
            .where(
                t.users.c.name == name,
                t.users.c.is_instance_admin,
                t.users.c.token_hash != digest,
            )
            .values(token_hash=digest)
        )
        try:
            async with transaction(conn or self._engine) as c:
                return (await c.execute(stmt)).rowcount > 0
        except IntegrityError as exc:
            raise Conflict("another user holds that token") from exc


async def _lock_instance_admins(c: AsyncConnection) -> None:
    """One change to who is an instance admin at a time (two admins deleting each
    other at once must not both succeed)."""
    await c.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ADMIN_BOOTSTRAP_LOCK})


async def _keep_an_instance_admin(c: AsyncConnection, user: User) -> None:
    """Refuse when ``user`` is the only instance admin."""
    other = await c.scalar(
        select(exists().where(t.users.c.is_instance_admin & (t.users.c.id != user.id)))
    )
    if not other:
        raise Conflict(
            f"{user.name!r} is the last instance admin; make another user an instance admin first"
        )


async def _keep_app_managers(c: AsyncConnection, user: User) -> None:
    """Refuse when ``user`` is the only member holding ``app_manage_members`` of an app."""
    holds = literal(Capability.APP_MANAGE_MEMBERS.value) == any_(t.app_members.c.capabilities)
    other = t.app_members.alias("other")
    other_holds = literal(Capability.APP_MANAGE_MEMBERS.value) == any_(other.c.capabilities)
    stmt = (
        select(t.apps.c.name)
        .join(t.app_members, t.app_members.c.app_id == t.apps.c.id)
        .where(t.app_members.c.user_id == user.id, holds)
        .where(
            ~exists().where(
                (other.c.app_id == t.apps.c.id) & (other.c.user_id != user.id) & other_holds
            )
        )
        .order_by(t.apps.c.name)
        .limit(_NAMED_APPS + 1)
    )
    names = list((await c.scalars(stmt)).all())
    if names:
        shown = ", ".join(names[:_NAMED_APPS]) + (", ..." if len(names) > _NAMED_APPS else "")
        raise Conflict(
            f"{user.name!r} is the only member holding app_manage_members of app(s) {shown};"
            " give it to another member (or delete the app) first"
        )


def _check_token(token: object) -> str:
    if not isinstance(token, str) or len(token) < MIN_TOKEN_CHARS:
        raise InvalidInput(f"a token must be a string of at least {MIN_TOKEN_CHARS} characters")
    return token
