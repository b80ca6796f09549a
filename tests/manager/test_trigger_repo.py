"""PostgresTriggerRepo on real PostgreSQL: Layout-E round trips and matching."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from manager_core import tables as t
from manager_core.postgres.triggers import PostgresTriggerRepo
from picloud_shared.errors import NotFound, UnknownScript
from picloud_shared.ids import AppId, ScriptId, TriggerId, UserId
from picloud_shared.outbox import OutboxSourceKind
from picloud_shared.retry import Backoff, RetryPolicy
from picloud_shared.triggers import (
    CreateDeadLetterTrigger,
    CreateDocsTrigger,
    CreateKvTrigger,
    DeadLetterTriggerDetails,
    DocsOp,
    DocsTriggerDetails,
    KvOp,
    KvTriggerDetails,
    TriggerKind,
)
from tests.manager import factories

pytestmark = pytest.mark.anyio

POLICY = RetryPolicy(Backoff.LINEAR, 10, 500, 3, 0.5)


async def _setup(engine: AsyncEngine) -> tuple[AppId, ScriptId, UserId]:
    app = await factories.app(engine)
    return app, await factories.script(engine, app), await factories.user(engine)


async def _kv(
    repo: PostgresTriggerRepo,
    app: AppId,
    script: ScriptId,
    user: UserId,
    glob: str,
    ops: tuple[KvOp, ...] = (),
) -> TriggerId:
    created = await repo.create_kv_trigger(CreateKvTrigger(app, script, user, glob, ops))
    return created.id


async def test_kv_trigger_round_trip(engine: AsyncEngine) -> None:
    """A KV trigger reads back with its glob, ops, principal and retry policy."""
    app, script, user = await _setup(engine)
    repo = PostgresTriggerRepo(engine)
    created = await repo.create_kv_trigger(
        CreateKvTrigger(app, script, user, "user:*", (KvOp.SET,), POLICY)
    )
    got = await repo.get(app, created.id)
    assert got == created
    assert got.kind is TriggerKind.KV
    assert got.details == KvTriggerDetails("user:*", (KvOp.SET,))
    assert (got.retry, got.registered_by_principal, got.script_id) == (POLICY, user, script)


async def test_docs_trigger_round_trip(engine: AsyncEngine) -> None:
    """A docs trigger reads back with its collection glob and ops."""
    app, script, user = await _setup(engine)
    repo = PostgresTriggerRepo(engine)
    created = await repo.create_docs_trigger(
        CreateDocsTrigger(app, script, user, "ord*", (DocsOp.INSERT, DocsOp.DELETE))
    )
    got = await repo.get(app, created.id)
    assert got == created
    assert got.details == DocsTriggerDetails("ord*", (DocsOp.INSERT, DocsOp.DELETE))


async def test_dead_letter_trigger_round_trip(engine: AsyncEngine) -> None:
    """A dead-letter trigger reads back with its source kinds."""
    app, script, user = await _setup(engine)
    repo = PostgresTriggerRepo(engine)
    created = await repo.create_dead_letter_trigger(
        CreateDeadLetterTrigger(app, script, user, (OutboxSourceKind.KV, OutboxSourceKind.HTTP))
    )
    got = await repo.get(app, created.id)
    assert got == created
    assert got.details == DeadLetterTriggerDetails((OutboxSourceKind.HTTP, OutboxSourceKind.KV))


async def test_create_writes_parent_and_details_in_one_transaction(engine: AsyncEngine) -> None:
    """One parent row and one details row of the right kind, nothing else."""
    app, script, user = await _setup(engine)
    trigger = await _kv(PostgresTriggerRepo(engine), app, script, user, "a*")
    assert len(await factories.rows(engine, t.triggers)) == 1
    assert len(await factories.rows(engine, t.kv_trigger_details)) == 1
    assert await factories.rows(engine, t.docs_trigger_details) == []
    (parent,) = await factories.rows(engine, t.triggers, t.triggers.c.id == trigger)
    assert (parent.kind, parent.match_prefix) == ("kv", "a")


async def test_unknown_script_is_rejected(engine: AsyncEngine) -> None:
    """A script id that does not exist raises UnknownScript and writes nothing."""
    app, _, user = await _setup(engine)
    repo = PostgresTriggerRepo(engine)
    with pytest.raises(UnknownScript):
        await repo.create_kv_trigger(CreateKvTrigger(app, ScriptId(uuid.uuid4()), user, "*"))
    assert await factories.rows(engine, t.triggers) == []


async def test_a_registrant_who_does_not_exist_is_not_found(engine: AsyncEngine) -> None:
    """A registrant deleted meanwhile (no such user row) is NotFound, as for a route,
    not invalid_input; nothing is written."""
    app, script, _ = await _setup(engine)
    repo = PostgresTriggerRepo(engine)
    with pytest.raises(NotFound):
        await repo.create_kv_trigger(CreateKvTrigger(app, script, UserId(uuid.uuid4()), "*"))
    assert await factories.rows(engine, t.triggers) == []


@pytest.mark.parametrize("kind", list(TriggerKind))
async def test_script_of_another_app_is_unknown(engine: AsyncEngine, kind: TriggerKind) -> None:
    """Every kind refuses a script that belongs to a different app."""
    app, _, user = await _setup(engine)
    foreign = await factories.script(engine, await factories.app(engine))
    repo = PostgresTriggerRepo(engine)
    create = {
        TriggerKind.KV: lambda: repo.create_kv_trigger(CreateKvTrigger(app, foreign, user, "*")),
        TriggerKind.DOCS: lambda: repo.create_docs_trigger(
            CreateDocsTrigger(app, foreign, user, "*")
        ),
        TriggerKind.DEAD_LETTER: lambda: repo.create_dead_letter_trigger(
            CreateDeadLetterTrigger(app, foreign, user)
        ),
    }[kind]
    with pytest.raises(UnknownScript):
        await create()


async def test_get_of_another_apps_trigger_is_none(engine: AsyncEngine) -> None:
    """get scoped to the wrong app answers None."""
    app, script, user = await _setup(engine)
    repo = PostgresTriggerRepo(engine)
    trigger = await _kv(repo, app, script, user, "*")
    assert await repo.get(await factories.app(engine), trigger) is None


async def test_list_paginates_in_id_order(engine: AsyncEngine) -> None:
    """Keyset pagination over an app's triggers (all kinds) visits each once."""
    app, script, user = await _setup(engine)
    repo = PostgresTriggerRepo(engine)
    ids = [await _kv(repo, app, script, user, f"k{i}") for i in range(4)]
    dl = await repo.create_dead_letter_trigger(CreateDeadLetterTrigger(app, script, user))
    other = await factories.app(engine)
    await _kv(repo, other, await factories.script(engine, other), user, "x")
    first = await repo.list(app, limit=3)
    rest = await repo.list(app, limit=3, after=first[-1].id)
    assert [tr.id for tr in [*first, *rest]] == sorted([*ids, dl.id])


async def test_delete_removes_parent_and_details(engine: AsyncEngine) -> None:
    """delete is True once and removes the details row; False for another app."""
    app, script, user = await _setup(engine)
    repo = PostgresTriggerRepo(engine)
    trigger = await _kv(repo, app, script, user, "*")
    assert await repo.delete(await factories.app(engine), trigger) is False
    assert await repo.delete(app, trigger) is True
    assert await repo.delete(app, trigger) is False
    assert await factories.rows(engine, t.kv_trigger_details) == []


async def test_app_delete_cascades_to_triggers_and_details(engine: AsyncEngine) -> None:
    """Deleting the app removes every trigger and details row it owned."""
    app, script, user = await _setup(engine)
    repo = PostgresTriggerRepo(engine)
    await _kv(repo, app, script, user, "*")
    await repo.create_docs_trigger(CreateDocsTrigger(app, script, user, "*"))
    await repo.create_dead_letter_trigger(CreateDeadLetterTrigger(app, script, user))
    await factories.delete_app(engine, app)
    for table in (t.triggers, t.kv_trigger_details, t.docs_trigger_details):
        assert await factories.rows(engine, table) == []
    assert await factories.rows(engine, t.dead_letter_trigger_details) == []


# -- matching ---------------------------------------------------------------------------


async def test_kv_matching_applies_globs(engine: AsyncEngine) -> None:
    """Only triggers whose glob matches the key are returned, with their policy."""
    app, script, user = await _setup(engine)
    repo = PostgresTriggerRepo(engine)
    star = await _kv(repo, app, script, user, "*")
    users = await _kv(repo, app, script, user, "user:*")
    exact = await _kv(repo, app, script, user, "user:1")
    qmark = await _kv(repo, app, script, user, "user:?")
    await _kv(repo, app, script, user, "order:*")
    await _kv(repo, app, script, user, "user:1x")
    await _kv(repo, app, script, user, "[ab]*")
    matches = await repo.list_matching_kv(app, "user:1", KvOp.SET)
    assert {m.trigger_id for m in matches} == {star, users, exact, qmark}
    assert {m.script_id for m in matches} == {script}
    assert {m.registered_by_principal for m in matches} == {user}


async def test_kv_matching_with_character_class_prefix(engine: AsyncEngine) -> None:
    """A glob starting with a character class has an empty literal prefix and matches."""
    app, script, user = await _setup(engine)
    repo = PostgresTriggerRepo(engine)
    cls = await _kv(repo, app, script, user, "[ab]x*")
    assert [m.trigger_id for m in await repo.list_matching_kv(app, "bx1", KvOp.SET)] == [cls]
    assert await repo.list_matching_kv(app, "cx1", KvOp.SET) == []


async def test_kv_empty_ops_match_every_op(engine: AsyncEngine) -> None:
    """An empty ops array matches set and delete; a set-only trigger never sees delete."""
    app, script, user = await _setup(engine)
    repo = PostgresTriggerRepo(engine)
    any_op = await _kv(repo, app, script, user, "k*", ())
    set_only = await _kv(repo, app, script, user, "k*", (KvOp.SET,))
    delete_only = await _kv(repo, app, script, user, "k*", (KvOp.DELETE,))
    on_set = {m.trigger_id for m in await repo.list_matching_kv(app, "k1", KvOp.SET)}
    on_delete = {m.trigger_id for m in await repo.list_matching_kv(app, "k1", KvOp.DELETE)}
    assert on_set == {any_op, set_only}
    assert on_delete == {any_op, delete_only}


async def test_kv_matching_never_returns_another_apps_triggers(engine: AsyncEngine) -> None:
    """A matching glob in another app does not match."""
    app, _, user = await _setup(engine)
    other = await factories.app(engine)
    repo = PostgresTriggerRepo(engine)
    await _kv(repo, other, await factories.script(engine, other), user, "*")
    assert await repo.list_matching_kv(app, "k", KvOp.SET) == []


async def test_kv_matching_finds_triggers_without_a_stored_prefix(engine: AsyncEngine) -> None:
    """A trigger row written without match_prefix (e.g. by hand) is still a candidate."""
    app, script, _ = await _setup(engine)
    async with engine.begin() as conn:
        trigger_id = (
            await conn.execute(
                sa.insert(t.triggers)
                .values(app_id=app, kind="kv", script_id=script)
                .returning(t.triggers.c.id)
            )
        ).scalar_one()
        await conn.execute(
            sa.insert(t.kv_trigger_details).values(trigger_id=trigger_id, key_glob="a*")
        )
    matches = await PostgresTriggerRepo(engine).list_matching_kv(app, "abc", KvOp.DELETE)
    assert [m.trigger_id for m in matches] == [trigger_id]


async def test_docs_matching_applies_globs_and_ops(engine: AsyncEngine) -> None:
    """Collection globs match; empty ops match insert, update and delete."""
    app, script, user = await _setup(engine)
    repo = PostgresTriggerRepo(engine)
    any_op = (await repo.create_docs_trigger(CreateDocsTrigger(app, script, user, "ord*"))).id
    upd = (
        await repo.create_docs_trigger(
            CreateDocsTrigger(app, script, user, "orders", (DocsOp.UPDATE,))
        )
    ).id
    await repo.create_docs_trigger(CreateDocsTrigger(app, script, user, "users"))
    for op, expected in (
        (DocsOp.INSERT, {any_op}),
        (DocsOp.UPDATE, {any_op, upd}),
        (DocsOp.DELETE, {any_op}),
    ):
        got = {m.trigger_id for m in await repo.list_matching_docs(app, "orders", op)}
        assert got == expected, op
    other = await factories.app(engine)
    assert await repo.list_matching_docs(other, "orders", DocsOp.INSERT) == []


async def test_dead_letter_matching_by_source_kind(engine: AsyncEngine) -> None:
    """Empty source kinds match every source; otherwise membership decides."""
    app, script, user = await _setup(engine)
    repo = PostgresTriggerRepo(engine)
    every = (await repo.create_dead_letter_trigger(CreateDeadLetterTrigger(app, script, user))).id
    kv_only = (
        await repo.create_dead_letter_trigger(
            CreateDeadLetterTrigger(app, script, user, (OutboxSourceKind.KV,))
        )
    ).id
    kv = {m.trigger_id for m in await repo.list_matching_dead_letter(app, OutboxSourceKind.KV)}
    http = {m.trigger_id for m in await repo.list_matching_dead_letter(app, OutboxSourceKind.HTTP)}
    assert kv == {every, kv_only}
    assert http == {every}
    other = await factories.app(engine)
    assert await repo.list_matching_dead_letter(other, OutboxSourceKind.KV) == []
