"""The schema's own guarantees, on a migrated database (template clone)."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from manager_core import tables as t

pytestmark = pytest.mark.anyio


async def _app(conn: AsyncConnection, name: str = "shop") -> uuid.UUID:
    return (
        await conn.execute(insert(t.apps).values(name=name).returning(t.apps.c.id))
    ).scalar_one()


async def _script(conn: AsyncConnection, app_id: uuid.UUID) -> uuid.UUID:
    stmt = insert(t.scripts).values(app_id=app_id, name="s", source="def handle(e, c): pass")
    return (await conn.execute(stmt.returning(t.scripts.c.id))).scalar_one()


async def _trigger(conn: AsyncConnection, app_id: uuid.UUID, script_id: uuid.UUID) -> uuid.UUID:
    stmt = insert(t.triggers).values(app_id=app_id, kind="kv", script_id=script_id)
    return (await conn.execute(stmt.returning(t.triggers.c.id))).scalar_one()


@pytest.mark.parametrize("name", ["Shop", "shop_1", "", "x" * 64, "shöp"])
async def test_app_name_check_rejects_invalid_names(engine: AsyncEngine, name: str) -> None:
    """App names must match [a-z0-9-]{1,63}."""
    async with engine.connect() as conn:
        with pytest.raises(IntegrityError, match="ck_apps_name"):
            await _app(conn, name)


async def test_app_name_check_accepts_valid_names(engine: AsyncEngine) -> None:
    """Lower-case letters, digits and dashes up to 63 characters are accepted."""
    async with engine.begin() as conn:
        await _app(conn, "my-app-2")
        await _app(conn, "a" * 63)


async def test_deleting_an_app_cascades_to_everything_it_owns(engine: AsyncEngine) -> None:
    """Deleting an app removes its scripts, data, triggers, details and outbox rows."""
    async with engine.begin() as conn:
        app_id = await _app(conn)
        other_id = await _app(conn, "other")
        for owner in (app_id, other_id):
            script_id = await _script(conn, owner)
            trigger_id = await _trigger(conn, owner, script_id)
            await conn.execute(
                insert(t.kv_trigger_details).values(trigger_id=trigger_id, key_glob="*")
            )
            await conn.execute(insert(t.kv_entries).values(app_id=owner, key="k", value=1))
            await conn.execute(
                insert(t.documents).values(app_id=owner, collection="c", id="d", data={})
            )
            execution_id = (
                await conn.execute(
                    insert(t.executions)
                    .values(app_id=owner, source_kind="kv", trigger_id=trigger_id)
                    .returning(t.executions.c.id)
                )
            ).scalar_one()
            await conn.execute(
                insert(t.outbox).values(
                    execution_id=execution_id,
                    app_id=owner,
                    source_kind="kv",
                    trigger_id=trigger_id,
                    payload={},
                )
            )
        await conn.execute(t.apps.delete().where(t.apps.c.id == app_id))
        for table in (
            t.scripts,
            t.triggers,
            t.kv_trigger_details,
            t.kv_entries,
            t.documents,
            t.executions,
            t.outbox,
        ):
            count = (await conn.execute(select(func.count()).select_from(table))).scalar_one()
            assert count == 1, table.name  # only the other app's row is left


@pytest.mark.parametrize(
    ("details", "column", "ops"),
    [
        (t.kv_trigger_details, "key_glob", ["set", "update"]),
        (t.docs_trigger_details, "collection_glob", ["insert", "set"]),
    ],
)
async def test_ops_check_rejects_an_unknown_op(
    engine: AsyncEngine, details: object, column: str, ops: list[str]
) -> None:
    """Trigger ops are limited to the kind's operations."""
    async with engine.connect() as conn:
        app_id = await _app(conn)
        trigger_id = await _trigger(conn, app_id, await _script(conn, app_id))
        with pytest.raises(IntegrityError, match="_ops"):
            await conn.execute(
                insert(details).values(trigger_id=trigger_id, **{column: "*"}, ops=ops)  # type: ignore[arg-type]
            )


async def test_empty_ops_default_means_any_op(engine: AsyncEngine) -> None:
    """ops defaults to the empty array."""
    async with engine.begin() as conn:
        app_id = await _app(conn)
        trigger_id = await _trigger(conn, app_id, await _script(conn, app_id))
        await conn.execute(insert(t.kv_trigger_details).values(trigger_id=trigger_id, key_glob="*"))
        ops = (await conn.execute(select(t.kv_trigger_details.c.ops))).scalar_one()
        assert ops == []


async def test_route_dispatch_mode_check(engine: AsyncEngine) -> None:
    """Routes default to 'sync' and accept only sync|async."""
    async with engine.connect() as conn:
        app_id = await _app(conn)
        script_id = await _script(conn, app_id)
        stmt = insert(t.routes).values(app_id=app_id, method="GET", path="/", script_id=script_id)
        mode = (await conn.execute(stmt.returning(t.routes.c.dispatch_mode))).scalar_one()
        assert mode == "sync"
        with pytest.raises(IntegrityError, match="ck_routes_dispatch_mode"):
            await conn.execute(
                insert(t.routes).values(
                    app_id=app_id, method="POST", path="/", script_id=script_id, dispatch_mode="x"
                )
            )


async def test_outbox_row_survives_trigger_deletion(engine: AsyncEngine) -> None:
    """outbox.trigger_id has no foreign key: deleting the trigger keeps the row."""
    async with engine.begin() as conn:
        app_id = await _app(conn)
        trigger_id = await _trigger(conn, app_id, await _script(conn, app_id))
        execution_id = (
            await conn.execute(
                insert(t.executions)
                .values(app_id=app_id, source_kind="kv", trigger_id=trigger_id)
                .returning(t.executions.c.id)
            )
        ).scalar_one()
        await conn.execute(
            insert(t.outbox).values(
                execution_id=execution_id,
                app_id=app_id,
                source_kind="kv",
                trigger_id=trigger_id,
                payload={},
            )
        )
        await conn.execute(t.triggers.delete())
        row = (await conn.execute(select(t.outbox.c.trigger_id))).scalar_one()
        assert row == trigger_id
        execution_trigger = (await conn.execute(select(t.executions.c.trigger_id))).scalar_one()
        assert execution_trigger is None
