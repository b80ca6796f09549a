"""Writing one outbox row with its execution record, in one statement.

:func:`enqueue` inserts the ``executions`` record and the ``outbox`` row together
(a data-modifying CTE: one round trip). The execution keeps its foreign keys valid
when the trigger, route or script vanished meanwhile (those ids become NULL there;
the outbox row keeps the originals and the dispatcher fails it cleanly); a missing
app inserts nothing.

:func:`enqueue_claimed` writes the row already claimed by this node — the lease and
token set, the attempt counted, the execution ``running`` — and returns it with
everything needed to run it (:data:`~manager_core.postgres.outbox_claims.CLAIM_CONTEXT`),
so a node that will run the row itself skips the claim transaction.
"""

from __future__ import annotations

from typing import Any

from psycopg.types.json import Jsonb

from manager_core.db import SqlConn, fetch
from manager_core.postgres.outbox_claims import (
    CLAIM_CONTEXT,
    ClaimedRow,
    ScriptSources,
    claimed_rows,
)
from manager_core.postgres.triggers import retry_values
from picloud_shared import wire
from picloud_shared.outbox import NewOutboxRow

_INSERT = """
    WITH app AS (
        SELECT id FROM apps WHERE id = CAST(%(app_id)s AS uuid)
    ), execution AS (
        INSERT INTO executions (id, app_id, source_kind, trigger_id, route_id, script_id,
                                status, attempts, trigger_depth, started_at)
        SELECT CAST(%(execution_id)s AS uuid), app.id, CAST(%(source_kind)s AS text),
               (SELECT id FROM triggers WHERE id = CAST(%(trigger_id)s AS uuid)),
               (SELECT id FROM routes WHERE id = CAST(%(route_id)s AS uuid)),
               (SELECT id FROM scripts WHERE id = CAST(%(script_id)s AS uuid)),
               CAST(%(status)s AS text), CAST(%(attempt)s AS int), CAST(%(trigger_depth)s AS int),
               CASE WHEN CAST(%(claimed_by)s AS text) IS NULL THEN NULL ELSE now() END
        FROM app
        RETURNING id
    ), claimed AS (
        INSERT INTO outbox (execution_id, app_id, source_kind, trigger_id, route_id,
                            script_id, payload, reply_to, reply_node, is_dead_letter_handler,
                            dead_letter_id, trigger_depth, attempt_count, retry_backoff,
                            retry_base_delay_ms, retry_max_delay_ms, retry_max_attempts,
                            retry_jitter, run_at, claimed_by, claimed_until)
        SELECT execution.id, CAST(%(app_id)s AS uuid), CAST(%(source_kind)s AS text),
               CAST(%(trigger_id)s AS uuid), CAST(%(route_id)s AS uuid),
               CAST(%(script_id)s AS uuid),
               %(payload)s, CAST(%(reply_to)s AS uuid), CAST(%(reply_node)s AS text),
               CAST(%(is_dead_letter_handler)s AS boolean), CAST(%(dead_letter_id)s AS uuid),
               CAST(%(trigger_depth)s AS int), CAST(%(attempt)s AS int),
               CAST(%(retry_backoff)s AS text), CAST(%(retry_base_delay_ms)s AS int),
               CAST(%(retry_max_delay_ms)s AS int), CAST(%(retry_max_attempts)s AS int),
               CAST(%(retry_jitter)s AS float8), coalesce(CAST(%(run_at)s AS timestamptz), now()),
               CAST(%(claimed_by)s AS text),
               now() + make_interval(secs => CAST(%(lease)s AS float8))
        FROM execution
        RETURNING *
    )
"""

_ENQUEUE = _INSERT + "SELECT id FROM claimed"

# ``durable`` false: the commit need not wait for the disk. That is right for a sync
# HTTP row: if its record is lost in a crash, its caller is gone with it, and the
# execution's own completion commits durably (WAL order makes this one durable too).
# An async row is durable: its 202 promises the request was accepted.
_ENQUEUE_CLAIMED = (
    _INSERT.replace(
        "WITH app AS",
        """WITH commit_mode AS (
        SELECT set_config('synchronous_commit', CASE WHEN %(durable)s
               THEN current_setting('synchronous_commit') ELSE 'off' END, true) AS mode
    ), app AS""",
        1,
    )
    + CLAIM_CONTEXT
    + " CROSS JOIN commit_mode"
)


def _params(
    row: NewOutboxRow, claimed_by: str | None, lease_seconds: float | None
) -> dict[str, Any]:
    return {
        "execution_id": row.execution_id,
        "app_id": row.app_id,
        "source_kind": row.source_kind.value,
        "trigger_id": row.trigger_id,
        "route_id": row.route_id,
        "script_id": row.script_id,
        "payload": Jsonb(row.payload, dumps=wire.dumps),
        "reply_to": row.reply_to,
        "reply_node": row.reply_node,
        "is_dead_letter_handler": row.is_dead_letter_handler,
        "dead_letter_id": row.dead_letter_id,
        "trigger_depth": row.trigger_depth,
        "run_at": row.run_at,
        "status": "queued" if claimed_by is None else "running",
        "attempt": 0 if claimed_by is None else 1,
        "claimed_by": claimed_by,
        "lease": lease_seconds,
        **retry_values(row.retry),
    }


async def enqueue(conn: SqlConn, row: NewOutboxRow) -> bool:
    """Insert the row and its execution record, due at ``row.run_at`` (or now).
    ``False`` when the app does not exist (nothing written)."""
    return bool(await fetch(conn, _ENQUEUE, _params(row, None, None)))


async def enqueue_claimed(
    conn: SqlConn,
    row: NewOutboxRow,
    *,
    token: str,
    lease_seconds: float,
    sources: ScriptSources,
) -> ClaimedRow | None:
    """Insert the row already claimed under ``token`` (attempt 1, execution
    ``running``) and return it ready to run; ``None`` when the app does not exist.
    Run it as its own (autocommitted) statement: a sync HTTP row's commit does not
    wait for the disk."""
    params = _params(row, token, lease_seconds)
    params["durable"] = row.reply_to is None
    rows = await fetch(conn, _ENQUEUE_CLAIMED, params)
    claimed = await claimed_rows(conn, rows, token, sources)
    return claimed[0] if claimed else None
