"""Plain SQLAlchemy Core inserts for the rows data/trigger tests stand on.

They deliberately bypass the identity repos (users, apps, scripts): the tests of
KV, docs, triggers and the outbox need only the rows to exist.
"""

from __future__ import annotations

import hashlib
import uuid

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from manager_core import tables as t
from picloud_shared.ids import AppId, ScriptId, UserId, new_execution_id
from picloud_shared.outbox import NewOutboxRow, OutboxSourceKind
from picloud_shared.principals import ALL_CAPABILITIES, Capability, Principal


async def user(engine: AsyncEngine, name: str | None = None) -> UserId:
    """A user with a random token hash."""
    name = name or f"user-{uuid.uuid4().hex[:8]}"
    token_hash = hashlib.sha256(uuid.uuid4().bytes).digest()
    async with engine.begin() as conn:
        stmt = sa.insert(t.users).values(name=name, token_hash=token_hash).returning(t.users.c.id)
        return UserId((await conn.execute(stmt)).scalar_one())


async def app(engine: AsyncEngine, name: str | None = None) -> AppId:
    """An app (no members)."""
    name = name or f"app-{uuid.uuid4().hex[:8]}"
    async with engine.begin() as conn:
        stmt = sa.insert(t.apps).values(name=name).returning(t.apps.c.id)
        return AppId((await conn.execute(stmt)).scalar_one())


async def script(engine: AsyncEngine, app_id: AppId, name: str | None = None) -> ScriptId:
    """A script of ``app_id`` whose handler does nothing."""
    name = name or f"s-{uuid.uuid4().hex[:8]}"
    async with engine.begin() as conn:
        stmt = (
            sa.insert(t.scripts)
            .values(app_id=app_id, name=name, source="def handle(event, ctx):\n    pass\n")
            .returning(t.scripts.c.id)
        )
        return ScriptId((await conn.execute(stmt)).scalar_one())


async def delete_app(engine: AsyncEngine, app_id: AppId) -> None:
    async with engine.begin() as conn:
        await conn.execute(sa.delete(t.apps).where(t.apps.c.id == app_id))


async def rows(engine: AsyncEngine, table: sa.Table, *where: sa.ColumnElement[bool]) -> list:
    """Every row of ``table`` matching ``where`` (ordered by nothing in particular)."""
    async with engine.connect() as conn:
        return list((await conn.execute(sa.select(table).where(*where))).all())


def principal(
    app_id: AppId,
    user_id: UserId | None = None,
    capabilities: frozenset[Capability] | set[Capability] = ALL_CAPABILITIES,
) -> Principal:
    """A principal of ``app_id`` holding ``capabilities`` (all by default)."""
    return Principal(
        user_id=user_id or UserId(uuid.uuid4()),
        app_id=app_id,
        capabilities=frozenset(capabilities),
    )


def http_row(app: AppId, **kw: object) -> NewOutboxRow:
    """A new outbox row of an HTTP execution of ``app`` (due now unless ``run_at``)."""
    return NewOutboxRow(
        execution_id=new_execution_id(),
        app_id=app,
        source_kind=OutboxSourceKind.HTTP,
        payload={"route_id": str(uuid.uuid4()), "event": {}},
        **kw,  # type: ignore[arg-type]
    )
