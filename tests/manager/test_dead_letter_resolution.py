"""Who may set a dead letter's ``resolution``, and handlers at the depth limit.

A handler's success makes a letter ``handled`` only while nobody settled it; its
failure (``handler_failed``) replaces a success, so a failure is never hidden by
another handler finishing later; neither overwrites a human's ``resolved`` or a
``replayed``. A dead letter at the maximum trigger depth still reaches its handlers.
Real PostgreSQL, real dispatcher and sandboxed executor.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from manager_core import tables as t
from manager_core.postgres.dead_letters import PostgresDeadLetterRepo
from manager_core.postgres.outbox import PostgresOutboxRepo
from picloud_shared.ids import AppId, DeadLetterId, ScriptId
from picloud_shared.outbox import OutboxSourceKind
from picloud_shared.triggers import CreateDeadLetterTrigger, CreateKvTrigger
from tests.manager import factories
from tests.manager.dispatch_world import FAST_RETRY, World, make_world

pytestmark = pytest.mark.anyio

REJECT = "def handle(event, ctx):\n    ctx.reject('not acceptable')\n"
FAIL_FAST = "def handle(event, ctx):\n    raise RuntimeError('handler broken')\n"
FAIL_SLOW = (
    "import time\n"
    "def handle(event, ctx):\n"
    "    time.sleep(1.5)\n"
    "    raise RuntimeError('handler broken')\n"
)


def succeed(*, slow: bool, writes: bool) -> str:
    """A handler that succeeds, after 1.5 s if ``slow``; one that ``writes`` commits its
    own transaction, one that does not is group-committed (``_COMPLETE_BATCH``)."""
    body = ["import time", "def handle(event, ctx):"]
    if slow:
        body.append("    time.sleep(1.5)")
    body.append(f"    ctx.kv.set('seen:{uuid.uuid4().hex[:6]}', 1)" if writes else "    pass")
    return "\n".join(body) + "\n"


# -- the repo's rule --------------------------------------------------------------------


async def _letter(engine: AsyncEngine, resolution: str | None) -> tuple[AppId, DeadLetterId]:
    app = await factories.app(engine)
    async with engine.begin() as conn:
        dl_id = (
            await conn.execute(
                sa.insert(t.dead_letters)
                .values(
                    app_id=app,
                    execution_id=uuid.uuid4(),
                    source_kind="kv",
                    payload={},
                    resolution=resolution,
                )
                .returning(t.dead_letters.c.id)
            )
        ).scalar_one()
    return app, DeadLetterId(dl_id)


@pytest.mark.parametrize(
    ("before", "outcome", "after"),
    [
        (None, "handled", "handled"),
        ("handled", "handled", "handled"),
        ("handler_failed", "handled", "handler_failed"),  # a success never hides a failure
        ("resolved", "handled", "resolved"),  # nor a human's resolve
        ("replayed", "handled", "replayed"),
        (None, "handler_failed", "handler_failed"),
        ("handled", "handler_failed", "handler_failed"),  # a failure is never hidden
        ("handler_failed", "handler_failed", "handler_failed"),
        ("resolved", "handler_failed", "resolved"),
        ("replayed", "handler_failed", "replayed"),
    ],
)
async def test_a_handlers_outcome_replaces_only_what_it_outranks(
    engine: AsyncEngine, before: str | None, outcome: str, after: str
) -> None:
    """``mark`` with a handler's outcome: ``handled`` only over none,
    ``handler_failed`` over none or ``handled``; ``True`` only when it was set."""
    app, dl_id = await _letter(engine, before)
    repo = PostgresDeadLetterRepo(engine, PostgresOutboxRepo(engine))
    changed = await repo.mark(app, dl_id, outcome)
    letter = await repo.get(app, dl_id)
    assert letter is not None
    assert letter.resolution == after
    assert changed is (before != after or before is None)


@pytest.mark.parametrize("before", [None, "handled", "handler_failed", "resolved"])
async def test_a_human_resolve_still_replaces_any_but_replayed(
    engine: AsyncEngine, before: str | None
) -> None:
    """The humans' rule is unchanged: resolve (and ``mark(resolved)``) over anything
    but ``replayed``."""
    app, dl_id = await _letter(engine, before)
    repo = PostgresDeadLetterRepo(engine, PostgresOutboxRepo(engine))
    assert (await repo.resolve(app, dl_id)).resolution == "resolved"
    app, dl_id = await _letter(engine, before)
    assert await repo.mark(app, dl_id, "resolved") is True


# -- the dispatcher ---------------------------------------------------------------------


@pytest.fixture
async def world(engine: AsyncEngine) -> AsyncIterator[World]:
    async with make_world(engine) as w:
        yield w


async def _handler(world: World, source: str) -> ScriptId:
    script = await world.script(source)
    await world.triggers.create_dead_letter_trigger(
        CreateDeadLetterTrigger(world.app_id, script, world.owner, (OutboxSourceKind.KV,))
    )
    return script


async def _rejecting_kv_trigger(world: World) -> None:
    script = await world.script(REJECT)
    await world.triggers.create_kv_trigger(
        CreateKvTrigger(world.app_id, script, world.owner, "job:*", (), FAST_RETRY)
    )


def _ran(script: ScriptId, status: str) -> sa.ColumnElement[bool]:
    return sa.and_(t.executions.c.script_id == script, t.executions.c.status == status)


async def _resolution(world: World) -> str | None:
    (letter,) = await world.rows(t.dead_letters)
    return letter.resolution  # type: ignore[no-any-return]


@pytest.mark.parametrize("writes", [False, True])
async def test_a_failure_is_not_hidden_by_a_slower_success(world: World, writes: bool) -> None:
    """Two handlers: one fails at once, the other succeeds later. The letter stays
    ``handler_failed`` (and so is never pruned)."""
    await _rejecting_kv_trigger(world)
    await _handler(world, FAIL_FAST)
    slow = await _handler(world, succeed(slow=True, writes=writes))
    await world.kv.set(world.app_id, "job:1", 1)
    async with world.running():
        await world.wait_count(t.dead_letters, t.dead_letters.c.resolution == "handler_failed")
        assert await world.count(t.executions, _ran(slow, "running")) == 1  # still running
        await world.wait_count(t.executions, _ran(slow, "succeeded"))
    assert await _resolution(world) == "handler_failed"


@pytest.mark.parametrize("writes", [False, True])
async def test_a_slower_failure_replaces_a_success(world: World, writes: bool) -> None:
    """Two handlers: one succeeds at once, the other fails later: ``handler_failed``."""
    await _rejecting_kv_trigger(world)
    await _handler(world, succeed(slow=False, writes=writes))
    slow = await _handler(world, FAIL_SLOW)
    await world.kv.set(world.app_id, "job:1", 1)
    async with world.running():
        await world.wait_count(t.dead_letters, t.dead_letters.c.resolution == "handled")
        assert await world.count(t.executions, _ran(slow, "running")) == 1  # still running
        await world.wait_count(t.executions, _ran(slow, "failed"))
    assert await _resolution(world) == "handler_failed"


@pytest.mark.parametrize(
    ("source", "status"),
    [
        (succeed(slow=True, writes=False), "succeeded"),
        (succeed(slow=True, writes=True), "succeeded"),
        (FAIL_SLOW, "failed"),
    ],
    ids=["succeeds-no-write", "succeeds-writing", "fails"],
)
async def test_a_resolve_made_while_a_handler_runs_stays(
    world: World, source: str, status: str
) -> None:
    """A human resolves the letter while its handler runs: whatever the handler's
    outcome, the letter stays ``resolved``."""
    await _rejecting_kv_trigger(world)
    slow = await _handler(world, source)
    await world.kv.set(world.app_id, "job:1", 1)
    repo = PostgresDeadLetterRepo(world.engine, world.outbox, world.emitter)
    async with world.running():
        await world.wait_count(t.executions, _ran(slow, "running"))
        (letter,) = await world.rows(t.dead_letters)
        assert (await repo.resolve(world.app_id, letter.id)).resolution == "resolved"
        await world.wait_count(t.executions, _ran(slow, status))
    assert await _resolution(world) == "resolved"


# -- the depth limit --------------------------------------------------------------------


async def test_a_dead_letter_at_the_depth_limit_reaches_its_handler(world: World) -> None:
    """A self-triggering chain fails at depth 8 (the limit): its dead letter's handler
    runs (at depth 9) and its KV write lands; the handler's write of the chain's key
    fires the chain's trigger at depth 10, which is skipped as usual."""
    chain = await world.script(
        "def handle(event, ctx):\n"
        "    if ctx.trigger_depth >= 8:\n"
        "        ctx.reject('too deep')\n"
        "    ctx.kv.set('loop', (event['value'] or 0) + 1)\n"
    )
    await world.triggers.create_kv_trigger(
        CreateKvTrigger(world.app_id, chain, world.owner, "loop", (), FAST_RETRY)
    )
    handler = await _handler(
        world,
        "def handle(event, ctx):\n"
        "    ctx.kv.set('alert', ctx.trigger_depth)\n"
        "    ctx.kv.set('loop', -1)\n",
    )
    await world.kv.set(world.app_id, "loop", 0)
    async with world.running():
        await world.wait_count(t.executions, t.executions.c.status == "skipped")
    assert await world.kv_value("alert") == 9
    assert await world.kv_value("loop") == -1
    (letter,) = await world.rows(t.dead_letters)
    assert (letter.trigger_depth, letter.resolution) == (8, "handled")
    (handled,) = await world.rows(t.executions, t.executions.c.script_id == handler)
    assert (handled.status, handled.trigger_depth) == ("succeeded", 9)
    (skipped,) = await world.rows(t.executions, t.executions.c.status == "skipped")
    assert (skipped.script_id, skipped.trigger_depth) == (chain, 10)
    assert await world.executions_by_status() == {
        "succeeded": 9,  # the chain at depth 0..7, and the handler
        "dead_lettered": 1,
        "skipped": 1,
    }
    assert await world.count(t.outbox) == 0


async def test_a_skipped_execution_records_that_it_never_ran(world: World) -> None:
    """A row past the depth limit is recorded ``skipped`` with no attempt and an error
    that says why it was not run."""
    chain = await world.script(
        "def handle(event, ctx):\n    ctx.kv.set('loop', (event['value'] or 0) + 1)\n"
    )
    await world.triggers.create_kv_trigger(
        CreateKvTrigger(world.app_id, chain, world.owner, "loop", (), FAST_RETRY)
    )
    await world.kv.set(world.app_id, "loop", 0)
    async with world.running(world.dispatcher(max_trigger_depth=2)):
        await world.wait_count(t.executions, t.executions.c.status == "skipped")
    (skipped,) = await world.rows(t.executions, t.executions.c.status == "skipped")
    assert skipped.trigger_depth == 3
    assert skipped.attempts == 0
    assert skipped.started_at is None
    assert skipped.finished_at is not None
    assert skipped.error_kind == "internal"
    assert skipped.error_message == "not run: trigger depth 3 exceeds the limit 2"
    assert await world.kv_value("loop") == 3
