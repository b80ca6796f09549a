"""Users and their bearer tokens.

A token is ``pc_`` + 32 random bytes (urlsafe base64). Only its SHA-256 is
stored; :meth:`PostgresUserRepo.authenticate` looks the hash up through the
unique index on ``users.token_hash`` and compares it in constant time, so
neither the token nor a timing difference on it is ever exposed.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from datetime import datetime

import attrs
from sqlalchemy import func, insert, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from manager_core import tables as t
from manager_core.db import transaction, translate_integrity_error
from picloud_shared.errors import Conflict, InvalidInput, InvalidName
from picloud_shared.ids import UserId
from picloud_shared.limits import MIN_TOKEN_CHARS

TOKEN_PREFIX = "pc_"
USER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,62}")
# Serialises first-start admin creation across several `picloud serve` processes.
_ADMIN_BOOTSTRAP_LOCK = 0x70C1_0AD1


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

        ``token`` defaults to a fresh random one. Raises ``InvalidName`` or
        ``Conflict`` (name taken).
        """
        check_user_name(name)
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


def _check_token(token: object) -> str:
    if not isinstance(token, str) or len(token) < MIN_TOKEN_CHARS:
        raise InvalidInput(f"a token must be a string of at least {MIN_TOKEN_CHARS} characters")
    return token
