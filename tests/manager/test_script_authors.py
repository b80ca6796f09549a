"""A script gets no more of its app's data than the user who last saved it held.

Scripts run as the user who registered their route or trigger, but anyone holding
``app_manage_scripts`` can rewrite them. Each version records its author's data
capabilities, and the principal it runs as is the registrant less what the author
lacked; a data trigger's script needs ``app_read_data`` (its event carries data).
Unit tests of ``AdminPrincipalResolver``, then the real dispatcher and executor.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from manager_core import tables as t
from manager_core.principals import AdminPrincipalResolver
from picloud_shared.errors import PrincipalRevoked
from picloud_shared.ids import AppId, UserId
from picloud_shared.outbox import OutboxSourceKind
from picloud_shared.principals import ALL_CAPABILITIES, DATA_CAPABILITIES, Capability
from picloud_shared.triggers import CreateKvTrigger
from tests.manager.dispatch_world import FAST_RETRY, World, make_world

C = Capability
APP, USER = AppId(uuid.uuid4()), UserId(uuid.uuid4())
OWNER_CAPS = tuple(c.value for c in ALL_CAPABILITIES)


def _resolve(
    kind: OutboxSourceKind,
    script: frozenset[Capability],
    caps: tuple[str, ...] = OWNER_CAPS,
    *,
    admin: bool = False,
):  # type: ignore[no-untyped-def]
    return AdminPrincipalResolver().resolve(
        app_id=APP,
        source_kind=kind,
        user_id=USER,
        user_exists=True,
        is_instance_admin=admin,
        capabilities=() if admin else caps,
        script_capabilities=script,
    )


def test_a_script_saved_with_every_data_capability_runs_as_the_registrant() -> None:
    principal = _resolve(OutboxSourceKind.HTTP, DATA_CAPABILITIES)
    assert principal.capabilities == ALL_CAPABILITIES


@pytest.mark.parametrize("admin", [False, True])
def test_what_the_author_lacked_is_withheld_from_the_registrant(admin: bool) -> None:
    """A route's script saved by a user who could only read: it cannot write, and
    keeps every other capability of the registrant (an instance admin's too)."""
    principal = _resolve(OutboxSourceKind.HTTP, frozenset({C.APP_READ_DATA}), admin=admin)
    assert not principal.can(C.APP_WRITE_DATA)
    assert principal.can(C.APP_READ_DATA)
    assert all(principal.can(c) for c in ALL_CAPABILITIES - {C.APP_WRITE_DATA})
    assert principal.user_id == USER


def test_a_registrant_without_a_capability_does_not_gain_it_from_the_author() -> None:
    principal = _resolve(
        OutboxSourceKind.HTTP,
        DATA_CAPABILITIES,
        ("app_manage_routes", "app_read_data"),
    )
    assert principal.can(C.APP_READ_DATA)
    assert not principal.can(C.APP_WRITE_DATA)


@pytest.mark.parametrize(
    "kind", [OutboxSourceKind.KV, OutboxSourceKind.DOCS, OutboxSourceKind.DEAD_LETTER]
)
def test_a_data_triggers_script_saved_without_read_data_is_revoked(
    kind: OutboxSourceKind,
) -> None:
    with pytest.raises(PrincipalRevoked, match="last saved by a user without app_read_data"):
        _resolve(kind, frozenset({C.APP_WRITE_DATA}))
    assert not _resolve(kind, frozenset({C.APP_READ_DATA})).can(C.APP_WRITE_DATA)


def test_a_data_triggers_registrant_without_read_data_is_revoked() -> None:
    with pytest.raises(PrincipalRevoked, match="does not hold app_read_data"):
        _resolve(OutboxSourceKind.KV, DATA_CAPABILITIES, ("app_manage_triggers",))


def test_a_routes_script_needs_no_data_capability() -> None:
    principal = _resolve(OutboxSourceKind.HTTP, frozenset())
    assert not principal.can(C.APP_READ_DATA)
    assert not principal.can(C.APP_WRITE_DATA)
    assert principal.can(C.APP_MANAGE_ROUTES)


# ---------------------------------------------------------------- real dispatcher

MIRROR = """
def handle(event, ctx):
    ctx.kv.set("mirror:" + event["key"], event["value"])
"""


@pytest.fixture
async def world(engine: AsyncEngine) -> AsyncIterator[World]:
    async with make_world(engine) as w:
        yield w


async def _trigger(world: World) -> None:
    """The owner's script and kv trigger on ``k*`` (saved by the owner: both caps)."""
    script = await world.script(MIRROR, name="mirror")
    await world.triggers.create_kv_trigger(
        CreateKvTrigger(world.app_id, script, world.owner, "k*", (), FAST_RETRY)
    )


@pytest.mark.anyio
async def test_a_rewrite_by_a_user_who_cannot_write_cannot_write(world: World) -> None:
    """The owner's trigger; its script re-saved by someone holding app_read_data but
    not app_write_data: the write fails (forbidden inside the script), nothing is
    written, and the same code saved by the owner again writes."""
    await _trigger(world)
    await world.scripts.update(
        world.app_id, "mirror", source=MIRROR, data_capabilities=frozenset({C.APP_READ_DATA})
    )
    await world.kv.set(world.app_id, "k1", 1)
    async with world.running():
        await world.wait_count(t.dead_letters)
    (dl,) = await world.rows(t.dead_letters)
    assert dl.error_kind == "uncaught_exception"  # the script's error (API: script_error)
    assert "app_write_data" in dl.error_message
    assert await world.kv_value("mirror:k1") is None

    await world.scripts.update(
        world.app_id, "mirror", source=MIRROR, data_capabilities=DATA_CAPABILITIES
    )
    await world.kv.set(world.app_id, "k2", 2)
    async with world.running():
        await world.wait_for(lambda: _mirrored(world, "k2"))


async def _mirrored(world: World, key: str) -> bool:
    return await world.kv_value("mirror:" + key) is not None


@pytest.mark.anyio
async def test_a_data_trigger_whose_script_was_saved_without_read_data_is_revoked(
    world: World,
) -> None:
    """The event would hand the value to code whose author may not read it: no run,
    no retry, dead-lettered ``principal_revoked`` with a message saying what to do."""
    await _trigger(world)
    await world.scripts.update(world.app_id, "mirror", data_capabilities=frozenset())
    await world.kv.set(world.app_id, "k1", 1)
    async with world.running():
        await world.wait_count(t.dead_letters)
    (dl,) = await world.rows(t.dead_letters)
    assert (dl.error_kind, dl.attempts) == ("principal_revoked", 0)
    assert "save it again" in dl.error_message
    (execution,) = await world.rows(t.executions, t.executions.c.source_kind == "kv")
    assert execution.logs == []
