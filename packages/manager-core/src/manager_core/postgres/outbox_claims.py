"""The outbox's dispatcher-side SQL (``PostgresOutboxRepo`` serves it): claim with
context, take a claimed row, finish (or record it skipped), give back.

Ownership of a claimed row has two layers:

* a **lease** (``claimed_by`` = a per-claim token, ``claimed_until``) written by the
  batched claim, so a row is never claimed twice while its lease runs, and a row
  whose node died comes back when the lease expires;
* a **row lock** held by the execution's own transaction from :func:`take` until
  its commit, so a row that is running is skipped by every other claimer
  (``SKIP LOCKED``) whatever its lease says, and is released the instant the
  node's connection dies.

The attempt is counted at claim time, in the claim's commit, so a row whose
execution keeps killing its node still reaches ``max_attempts``.
"""

from __future__ import annotations

import uuid
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import sqlalchemy as sa
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from manager_core import tables as t
from manager_core.db import SqlConn, execute, fetch
from manager_core.postgres.triggers import retry_from_row
from picloud_shared import wire
from picloud_shared.execution import ExecResult
from picloud_shared.ids import (
    AppId,
    DeadLetterId,
    ExecutionId,
    InboxId,
    RouteId,
    ScriptId,
    TriggerId,
    UserId,
)
from picloud_shared.limits import MAX_TIMEOUT_SECONDS, SYNC_WAIT_BUFFER_SECONDS
from picloud_shared.outbox import OutboxRow, OutboxSourceKind
from picloud_shared.principals import Capability
from picloud_shared.status import ExecErrorKind, ExecutionStatus

# What a claimed row needs to run, joined to the claimed rows ``c`` (a CTE named
# ``claimed``): its app, script version and limits, whether its trigger or route still
# exists, and the registrant it runs as.
CLAIM_CONTEXT = """
    SELECT c.*,
           a.name AS app_name,
           s.id IS NOT NULL AS script_exists, s.version,
           s.timeout_seconds, s.memory_limit_mb,
           (tr.id IS NOT NULL OR r.id IS NOT NULL) AS owner_exists,
           coalesce(tr.registered_by_principal, r.registered_by) AS principal_id,
           u.id IS NOT NULL AS user_exists,
           coalesce(u.is_instance_admin, false) AS is_instance_admin,
           m.capabilities
    FROM claimed c
    JOIN apps a ON a.id = c.app_id
    LEFT JOIN scripts s ON s.id = c.script_id AND s.app_id = c.app_id
    LEFT JOIN triggers tr ON tr.id = c.trigger_id AND tr.app_id = c.app_id
    LEFT JOIN routes r ON r.id = c.route_id AND r.app_id = c.app_id
    LEFT JOIN users u ON u.id = coalesce(tr.registered_by_principal, r.registered_by)
    LEFT JOIN app_members m ON m.app_id = c.app_id AND m.user_id = u.id
"""

# Which rows of the outbox a node may claim now: due, not leased, and not a sync
# request another node's caller waits for (unless nobody can wait for it any more).
_CLAIMABLE = """
    {o}.claimed_until IS NULL AND {o}.run_at <= now()
    AND ({o}.reply_to IS NULL OR {o}.reply_node = %(node)s
         OR {o}.created_at < now() - make_interval(secs => CAST(%(orphan_after)s AS float8)))
"""

# One claim shares its batch fairly between the apps that have rows due, so that one
# app's backlog never holds up another app's executions:
#
# * ``due_apps`` walks the ``(app_id, run_at, id)`` index app by app (a skip scan: one
#   probe per app, however many rows each has), from just after ``after`` (the last
#   app of the previous claim, so claims take turns round the apps), for at most
#   ``limit`` apps (and one more, to know whether there are more);
# * each of them gets ``share`` = ceil(limit / apps) of its oldest due rows.
#
# Every claimed row carries ``claim_more_apps``, ``claim_last_app`` and
# ``claim_share``, from which :func:`claim` tells whether rows may be left due (an app
# gave its whole share, or apps past the cap were not served) and where the next
# claim starts.
# ``set_config(..., true)`` in the statement itself: a lost claim is harmless (the rows
# are simply not claimed), so its commit need not wait for the disk, and the claim runs
# as one autocommitted statement.
_CLAIM = (
    """
    WITH RECURSIVE nosync AS (
        SELECT set_config('synchronous_commit', 'off', true) AS off
    ), due_apps (n, app_id) AS (
        SELECT 1, (SELECT o.app_id FROM outbox o
                   WHERE """
    + _CLAIMABLE.format(o="o")
    + """ AND (CAST(%(after)s AS uuid) IS NULL OR o.app_id > CAST(%(after)s AS uuid))
                   ORDER BY o.app_id LIMIT 1)
        UNION ALL
        SELECT a.n + 1, (SELECT o.app_id FROM outbox o
                         WHERE """
    + _CLAIMABLE.format(o="o")
    + """ AND o.app_id > a.app_id
                         ORDER BY o.app_id LIMIT 1)
        FROM due_apps a
        WHERE a.app_id IS NOT NULL AND a.n <= %(limit)s
    ), picked AS MATERIALIZED (
        SELECT n, app_id FROM due_apps WHERE app_id IS NOT NULL AND n <= %(limit)s
    ), share AS MATERIALIZED (
        SELECT (%(limit)s + count(*) - 1) / greatest(count(*), 1) AS share,
               (SELECT app_id FROM picked ORDER BY n DESC LIMIT 1) AS last_app,
               EXISTS (SELECT FROM due_apps WHERE n > %(limit)s AND app_id IS NOT NULL)
                   AS more_apps
        FROM picked
    ), due AS (
        SELECT d.id FROM picked p CROSS JOIN LATERAL (
            SELECT o.id FROM outbox o
            WHERE o.app_id = p.app_id AND """
    + _CLAIMABLE.format(o="o")
    + """
            ORDER BY o.run_at, o.id
            LIMIT (SELECT share FROM share)
            FOR UPDATE SKIP LOCKED
        ) d
    ), claimed AS (
        UPDATE outbox o
        SET claimed_by = %(token)s,
            claimed_until = now() + make_interval(secs => CAST(%(lease)s AS float8)),
            attempt_count = o.attempt_count + 1
        WHERE o.id = ANY(ARRAY(SELECT id FROM due))  -- probes, whatever the plan thinks
        RETURNING o.*, (SELECT more_apps FROM share) AS claim_more_apps,
                  (SELECT last_app FROM share) AS claim_last_app,
                  (SELECT share FROM share) AS claim_share
    ), running AS (
        UPDATE executions e
        SET status = 'running', attempts = c.attempt_count,
            started_at = coalesce(e.started_at, now())
        FROM claimed c
        WHERE e.id = c.execution_id
          -- spelled out so the planner probes the primary key instead of hashing a scan
          AND e.id = ANY(ARRAY(SELECT execution_id FROM claimed))
    )
    """
    + CLAIM_CONTEXT
    + """
    CROSS JOIN nosync
    ORDER BY c.run_at, c.id
    """
)

# A claim that may have left rows due (see ``_CLAIM``) is followed at once by another,
# for the rest of its batch; at most this many statements make one claim.
CLAIM_ROUNDS = 3


# Rows whose lease expired and whose execution is not running (not locked) are due again.
# The expired rows are found in one scan and then probed by id: no join the planner
# could turn into a scan of the outbox per row when it believes the table is empty.
_RECOVER = """
    WITH expired AS MATERIALIZED (
        SELECT id FROM outbox WHERE claimed_until < now()
        FOR UPDATE SKIP LOCKED
    )
    UPDATE outbox SET claimed_by = NULL, claimed_until = NULL
    WHERE id = ANY(ARRAY(SELECT id FROM expired))
"""


@attrs.frozen
class ScriptCode:
    """What a version of a script never changes: its source, and the data
    capabilities of the user who saved it."""

    source: str
    data_capabilities: frozenset[Capability]


class ScriptSources:
    """Script code by ``(script id, version)``, so a claim carries only versions.

    A version's code never changes (an update makes a new version), so entries
    never go stale; the least recently used are evicted past ``capacity``.
    """

    def __init__(self, capacity: int = 512) -> None:
        self._capacity = capacity
        self._cache: OrderedDict[tuple[ScriptId, int], ScriptCode] = OrderedDict()

    def get(self, script_id: ScriptId, version: int) -> ScriptCode | None:
        code = self._cache.get((script_id, version))
        if code is not None:
            self._cache.move_to_end((script_id, version))
        return code

    def put(self, script_id: ScriptId, version: int, code: ScriptCode) -> None:
        self._cache[(script_id, version)] = code
        self._cache.move_to_end((script_id, version))
        while len(self._cache) > self._capacity:
            self._cache.popitem(last=False)

    async def resolve(
        self, conn: SqlConn, wanted: set[tuple[ScriptId, int]]
    ) -> dict[tuple[ScriptId, int], tuple[int, ScriptCode]]:
        """``(id, version) → (version, code)`` for every wanted script, loading what
        is not cached in one query. A script updated in between comes back at its
        newer version, which is then the one that runs."""
        out: dict[tuple[ScriptId, int], tuple[int, ScriptCode]] = {}
        missing: set[ScriptId] = set()
        for sid, version in wanted:
            code = self.get(sid, version)
            if code is None:
                missing.add(sid)
            else:
                out[(sid, version)] = (version, code)
        if missing:
            rows = await fetch(
                conn,
                "SELECT id, version, source, data_capabilities FROM scripts"
                " WHERE id = ANY(%(ids)s)",
                {"ids": list(missing)},
            )
            latest = {
                row.id: (
                    row.version,
                    ScriptCode(row.source, Capability.parse_all(row.data_capabilities)),
                )
                for row in rows
            }
            for sid, version in wanted:
                if sid in latest:
                    self.put(sid, *latest[sid])
                    out[(sid, version)] = latest[sid]
        return out


@attrs.frozen
class ScriptInfo:
    id: ScriptId
    source: str
    version: int
    timeout_seconds: int
    memory_limit_mb: int
    data_capabilities: frozenset[Capability]


@attrs.frozen
class ClaimedRow:
    """A claimed outbox row with everything needed to run it."""

    row: OutboxRow
    token: str
    app_name: str
    script: ScriptInfo | None  # None: the script was deleted
    owner_exists: bool  # the trigger or route still exists
    principal_id: UserId | None
    user_exists: bool
    is_instance_admin: bool
    capabilities: tuple[str, ...]


def outbox_row_from_row(row: Any) -> OutboxRow:
    """An :class:`OutboxRow` from a full ``outbox`` row."""
    return OutboxRow(
        id=row.id,
        execution_id=ExecutionId(row.execution_id),
        app_id=AppId(row.app_id),
        source_kind=OutboxSourceKind(row.source_kind),
        payload=row.payload,
        script_id=None if row.script_id is None else ScriptId(row.script_id),
        trigger_id=None if row.trigger_id is None else TriggerId(row.trigger_id),
        route_id=None if row.route_id is None else RouteId(row.route_id),
        reply_to=None if row.reply_to is None else InboxId(row.reply_to),
        reply_node=row.reply_node,
        is_dead_letter_handler=row.is_dead_letter_handler,
        dead_letter_id=None if row.dead_letter_id is None else DeadLetterId(row.dead_letter_id),
        trigger_depth=row.trigger_depth,
        attempt_count=row.attempt_count,
        retry=retry_from_row(row),
        run_at=row.run_at,
    )


def new_claim_token(node_id: str) -> str:
    return f"{node_id}/{uuid.uuid4().hex[:12]}"


# A sync HTTP row is run by the node whose caller waits for it (its inbox is in that
# process). Past the longest possible wait nobody waits any more: any node may then
# claim it, to fail it without running it.
ORPHANED_SYNC_AFTER_SECONDS = MAX_TIMEOUT_SECONDS + SYNC_WAIT_BUFFER_SECONDS + 30


@attrs.define
class AppRotation:
    """Where a node's next claim starts in its round of the apps with rows due (the
    last app the previous claim looked at; ``None``: from the first)."""

    after: AppId | None = None


async def claim(
    conn: SqlConn,
    *,
    node_id: str,
    limit: int,
    lease_seconds: float,
    sources: ScriptSources,
    rotation: AppRotation | None = None,
) -> list[ClaimedRow]:
    """Claim up to ``limit`` due rows, shared fairly between the apps that have some
    (see ``_CLAIM``). Fewer than ``limit`` when no more are due for this node (or,
    rarely, when ``CLAIM_ROUNDS`` statements did not fill the batch).

    Each statement commits by itself: run them on an autocommitting connection. A
    batch that an app could not fill (it had fewer rows due than its share) is made up
    by a second statement, and a third when the round of apps wrapped around."""
    rotation = rotation if rotation is not None else AppRotation()
    out: list[ClaimedRow] = []
    for _ in range(CLAIM_ROUNDS):
        want = limit - len(out)
        started_after = rotation.after
        rows = await fetch(
            conn,
            _CLAIM,
            {
                "limit": want,
                "after": started_after,
                "token": new_claim_token(node_id),
                "lease": lease_seconds,
                "node": node_id,
                "orphan_after": ORPHANED_SYNC_AFTER_SECONDS,
            },
        )
        out += await claimed_rows(conn, rows, sources)
        # Apps with rows due past the ones this statement served: the next starts there.
        more_apps = bool(rows) and rows[0].claim_more_apps
        rotation.after = AppId(rows[0].claim_last_app) if more_apps else None
        if len(out) >= limit:
            break
        per_app = Counter(m.app_id for m in rows)
        full_share = bool(rows) and max(per_app.values()) >= rows[0].claim_share
        if not (full_share or more_apps or started_after is not None):
            break  # every app with rows due gave all it had
    return out


async def claimed_rows(
    conn: SqlConn, rows: Sequence[Any], sources: ScriptSources
) -> list[ClaimedRow]:
    """``ClaimedRow``s from rows of :data:`CLAIM_CONTEXT` (sources from the cache); each
    keeps the token it was claimed under (``claimed_by``)."""
    found = await sources.resolve(conn, {(m.script_id, m.version) for m in rows if m.script_exists})
    out: list[ClaimedRow] = []
    for m in rows:
        script = None
        if m.script_exists and (m.script_id, m.version) in found:
            version, code = found[(m.script_id, m.version)]
            script = ScriptInfo(
                m.script_id,
                code.source,
                version,
                m.timeout_seconds,
                m.memory_limit_mb,
                code.data_capabilities,
            )
        out.append(
            ClaimedRow(
                row=outbox_row_from_row(m),
                token=m.claimed_by,
                app_name=m.app_name,
                script=script,
                owner_exists=m.owner_exists,
                principal_id=m.principal_id,
                user_exists=m.user_exists,
                is_instance_admin=m.is_instance_admin,
                capabilities=tuple(m.capabilities or ()),
            )
        )
    return out


async def recover_expired(conn: SqlConn) -> int:
    """Make rows whose lease expired (and that nobody is running) due again.

    Never a prepared statement: without parameters it would keep one generic plan,
    made while the outbox was (most likely) empty; planned afresh it sees the table's
    size. Once a second per node, the planning costs nothing that matters."""
    return await execute(conn, _RECOVER, {}, prepare=False)


async def take(
    conn: AsyncConnection,
    row_id: int,
    token: str,
    attempt_count: int,
    *,
    idle_seconds: float | None = None,
) -> bool:
    """Lock a claimed row for this transaction (``SELECT … FOR UPDATE``: no new tuple,
    so no index churn for concurrent serializable transactions to trip over).

    The row is this runner's while it is claimed under ``token``, and also when lease
    recovery released it (its lease ran out while an execution of it held it locked:
    the heartbeat skips locked rows) and no other claim took it since:
    ``attempt_count`` is still the claim's.

    ``idle_seconds``: how long the transaction may then sit idle between statements
    before PostgreSQL ends it (``idle_in_transaction_session_timeout``, for this
    transaction only), set in the same round trip. ``False`` when the row is gone or
    another claim owns it now.
    """
    o = t.outbox.c
    columns: list[Any] = [o.id]
    if idle_seconds is not None:
        idle_ms = str(int(idle_seconds * 1000))
        columns.append(sa.func.set_config("idle_in_transaction_session_timeout", idle_ms, True))
    result = await conn.execute(
        select(*columns).where(o.id == row_id, _still_ours(token, attempt_count)).with_for_update()
    )
    return result.first() is not None


def _still_ours(token: str, attempt_count: int | None) -> sa.ColumnElement[bool]:
    """The row is still the claim's: claimed under ``token``, or (given the claim's
    ``attempt_count``) released by lease recovery while its execution held it locked
    and taken by no claim since (a claim counts an attempt)."""
    o = t.outbox.c
    if attempt_count is None:
        return o.claimed_by == token
    released = sa.and_(o.claimed_by.is_(None), o.attempt_count == attempt_count)
    return sa.or_(o.claimed_by == token, released)


# Only a row still claimed under the token its runner holds: a row whose lease ran out
# and that another claim took meanwhile has a new owner, whose lease is its own. A row
# an execution holds locked (from its first host call to its commit) is skipped, not
# waited for: the heartbeat must not queue behind a long script, nor hold the rows it
# already updated (and so every other execution's first host call) while it waits.
# Lease recovery skips locked rows too, so a running execution keeps its row; one that
# rolls back finds it again with ``take``.
_RENEW = """
    WITH mine AS MATERIALIZED (
        SELECT o.id FROM outbox o
        JOIN unnest(CAST(%(ids)s AS bigint[]), CAST(%(tokens)s AS text[])) AS l(id, token)
          ON o.id = l.id AND o.claimed_by = l.token
        WHERE o.id = ANY(%(ids)s)
        FOR UPDATE OF o SKIP LOCKED
    )
    UPDATE outbox o
    SET claimed_until = now() + make_interval(secs => CAST(%(lease)s AS float8))
    WHERE o.id = ANY(ARRAY(SELECT id FROM mine))
"""


async def renew_leases(conn: SqlConn, leases: Mapping[int, str], lease_seconds: float) -> int:
    """Extend the lease of rows this node is still running (the heartbeat): ``leases``
    maps each row's id to the token it was claimed under. Returns the rows renewed; a
    row another claim owns now is not."""
    if not leases:
        return 0
    return await execute(
        conn,
        _RENEW,
        {"lease": lease_seconds, "ids": list(leases), "tokens": list(leases.values())},
    )


# Rows are found by ``id = ANY(ARRAY(...))``: an index probe per row whatever the
# (cached, possibly empty-table) plan believes about the outbox's size.
# The batch travels as one JSON array (one parameter, one ``json.dumps``) rather than
# parallel arrays, whose element-by-element quoting cost more than the statement.
# ``durable`` false (its own autocommitted statement): the commit does not wait for the
# disk. What it records is bookkeeping only — these scripts wrote nothing — and if a
# database crash loses it, the row is back under its expired lease: a trigger or
# async row runs again (at least once, as after any crash; a re-run of a script that
# writes nothing changes nothing), a sync row is failed (its caller was answered).
_COMPLETE_BATCH = """
    WITH commit_mode AS (
        SELECT set_config('synchronous_commit', CASE WHEN %(durable)s
               THEN current_setting('synchronous_commit') ELSE 'off' END, true) AS mode
    ), f AS (
        SELECT * FROM jsonb_to_recordset(CAST(%(items)s AS jsonb))
            AS f(id bigint, token text, execution_id uuid, attempts int, logs jsonb,
                 result jsonb)
    ), done AS (
        DELETE FROM outbox o
        USING f
        WHERE o.id = ANY(ARRAY(SELECT id FROM f)) AND o.id = f.id AND o.claimed_by = f.token
        RETURNING o.id, o.execution_id, o.dead_letter_id, o.is_dead_letter_handler
    ), finished AS (
        UPDATE executions e
        SET status = 'succeeded', attempts = f.attempts, logs = f.logs, result = f.result,
            error_kind = NULL, error_message = NULL, error_traceback = NULL,
            finished_at = now()
        FROM f
        WHERE e.id = ANY(ARRAY(SELECT execution_id FROM done)) AND e.id = f.execution_id
    ), handled AS (
        UPDATE dead_letters SET resolution = 'handled', resolved_at = now()
        WHERE id = ANY(ARRAY(SELECT dead_letter_id FROM done WHERE is_dead_letter_handler))
          -- only an unsettled letter (dead_letters.may_become): a success never hides
          -- another handler's failure, a human's resolve or a replay
          AND resolution IS NULL
    )
    SELECT id FROM done CROSS JOIN commit_mode
"""


async def complete_batch(
    conn: SqlConn,
    items: Sequence[tuple[ClaimedRow, ExecResult]],
    *,
    own_transaction: bool = False,
) -> set[int]:
    """Finish successful executions that wrote nothing, all in one statement.

    Returns the ids of the rows this node still owned (the others were lost to a
    recovered lease and are left alone). With ``own_transaction`` (the statement is
    autocommitted) it does not wait for the disk (see ``_COMPLETE_BATCH``); in a
    caller's transaction it never changes how that transaction commits.
    """
    batch = [
        {
            "id": c.row.id,
            "token": c.token,
            "execution_id": str(c.row.execution_id),
            "attempts": c.row.attempt_count,
            "logs": list(r.logs),
            "result": None if r.response is None else r.response.to_wire(),
        }
        for c, r in items
    ]
    params = {"items": wire.dumps(batch), "durable": not own_transaction}
    rows = await fetch(conn, _COMPLETE_BATCH, params)
    return {row.id for row in rows}


_MILLISECOND = sa.literal_column("interval '1 millisecond'", sa.Interval)


def due_after(delay_ms: float) -> sa.ColumnElement[Any]:
    """``run_at`` for a row due ``delay_ms`` from now by the database's clock.

    Every time the outbox compares (``run_at``, ``claimed_until``, ``created_at``) is
    the database's ``now()``; a node's own clock, possibly minutes off, plays no part."""
    return sa.func.now() + sa.cast(sa.literal(float(delay_ms)), sa.Double) * _MILLISECOND


async def reschedule(
    conn: AsyncConnection, row_id: int, *, delay_ms: float, uncount_attempt: bool = False
) -> None:
    """Give a row back, due ``delay_ms`` after the database's ``now()``;
    ``uncount_attempt`` undoes the claim's count."""
    values: dict[str, Any] = {
        "claimed_by": None,
        "claimed_until": None,
        "run_at": due_after(delay_ms),
    }
    if uncount_attempt:
        values["attempt_count"] = t.outbox.c.attempt_count - 1
    await conn.execute(update(t.outbox).where(t.outbox.c.id == row_id).values(**values))


async def give_back(
    conn: AsyncConnection,
    row_id: int,
    token: str,
    *,
    delay_ms: float = 0.0,
    attempt_count: int | None = None,
) -> None:
    """Return a claimed row without counting the attempt (saturation, shutdown), due
    ``delay_ms`` after the database's ``now()`` (``attempt_count``: the claim's, to
    find the row also once recovery released it: ``_still_ours``)."""
    result = await conn.execute(
        update(t.outbox)
        .where(t.outbox.c.id == row_id, _still_ours(token, attempt_count))
        .values(
            claimed_by=None,
            claimed_until=None,
            attempt_count=t.outbox.c.attempt_count - 1,
            run_at=due_after(delay_ms),
        )
        .returning(t.outbox.c.execution_id, t.outbox.c.attempt_count)
    )
    row = result.first()
    if row is not None:
        status = ExecutionStatus.RETRYING if row.attempt_count > 0 else ExecutionStatus.QUEUED
        await conn.execute(
            update(t.executions)
            .where(t.executions.c.id == row.execution_id)
            .values(status=status.value, attempts=row.attempt_count)
        )


async def record_skipped(conn: AsyncConnection, execution_id: ExecutionId, message: str) -> None:
    """Record an execution ``skipped`` (past the trigger depth limit): it never ran, so
    it has no attempt (the claim counted one) and no start, only a finish and an error
    (kind ``internal``, ``message`` saying why it was not run)."""
    await conn.execute(
        update(t.executions)
        .where(t.executions.c.id == execution_id)
        .values(
            status=ExecutionStatus.SKIPPED.value,
            attempts=0,
            started_at=None,
            error_kind=ExecErrorKind.INTERNAL.value,
            error_message=message,
            error_traceback=None,
            logs=[],
            result=sa.null(),
            finished_at=sa.func.now(),
        )
    )
