"""What an app stores, in bytes: the definition, the deltas writes append, the totals.

**What counts** — one definition, used by the writes, the compactor, migration 0006
and the tests' recount:

- a KV entry: ``octet_length(key) + octet_length(value::text)``;
- a document: ``octet_length(collection) + octet_length(id) + octet_length(data::text)``;
- a script: ``octet_length(source)``, its source's UTF-8 bytes.

That is the UTF-8 bytes of the names plus the bytes of the value as PostgreSQL
renders its ``jsonb`` (not the on-disk, possibly compressed size, which no write
can know in advance; nor the bytes the client sent, which the table does not keep).

**Accounting.** Every write appends its delta (new size - old size; none when 0) to
``app_storage_deltas`` in the write's own statement (a data-modifying CTE), so it
commits or rolls back with the write and costs no round trip. Appends never
conflict with each other, so concurrent writers of one app do not serialize on a
counter row. :meth:`PostgresStorageRepo.compact` folds the deltas into
``app_storage`` every few seconds; an app's usage is ``app_storage.bytes`` plus
its pending deltas, read in one statement (one snapshot: a delta is counted either
pending or folded, never both).

**Scripts** append no deltas: their bytes are summed from ``scripts`` in that same
statement. An app holds at most ``MAX_SCRIPTS_PER_APP`` of them, and
``octet_length`` of a ``text`` reads its stored length without decompressing or
fetching it, so the sum costs an index scan of a few hundred rows; in exchange it is
exact by construction (scripts stored before they counted need no backfill, and
they leave with their app).
"""

from __future__ import annotations

from collections.abc import Iterable

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from manager_core import tables as t
from manager_core.db import transaction
from picloud_shared.ids import AppId

__all__ = ["PostgresStorageRepo", "doc_size", "kv_size", "record_delta", "sized", "within"]

_DELTAS = t.app_storage_deltas


def kv_size(key: sa.ColumnElement[str], value: sa.ColumnElement[object]) -> sa.ColumnElement[int]:
    """The counted bytes of a KV entry."""
    return sa.func.octet_length(key) + sa.func.octet_length(sa.cast(value, sa.Text))


def doc_size(
    collection: sa.ColumnElement[str], doc_id: sa.ColumnElement[str], data: sa.ColumnElement[object]
) -> sa.ColumnElement[int]:
    """The counted bytes of a document."""
    return (
        sa.func.octet_length(collection)
        + sa.func.octet_length(doc_id)
        + sa.func.octet_length(sa.cast(data, sa.Text))
    )


def sized(value: sa.ColumnElement[object], fixed: sa.ColumnElement[int] | int) -> sa.CTE:
    """CTE ``sized(value, delta)``: the new JSON ``value`` (parsed once: the inner CTE
    is materialized) and ``delta`` = its ``value::text`` bytes + ``fixed`` (the name
    bytes, minus the size of the row it replaces)."""
    parsed = sa.select(value.label("value")).cte("parsed").prefix_with("MATERIALIZED")
    size = sa.func.octet_length(sa.cast(parsed.c.value, sa.Text))
    return sa.select(parsed.c.value, (size + fixed).label("delta")).cte("sized")


def within(delta: sa.ColumnElement[int], budget: int | None) -> list[sa.ColumnElement[bool]]:
    """The condition a write growing its app by ``delta`` runs under: it shrinks, or
    its growth fits ``budget`` (``None``: no condition)."""
    if budget is None:
        return []
    return [sa.or_(delta <= 0, delta <= sa.literal(budget, sa.BigInteger))]


def record_delta(
    app_id: AppId, delta: sa.ColumnElement[int], *froms: sa.FromClause, name: str = "delta"
) -> sa.CTE:
    """A CTE appending ``delta`` (over ``froms``: the write's ``RETURNING`` CTE, …) to
    ``app_storage_deltas`` for each row it yields, unless it is 0."""
    rows = sa.select(sa.literal(app_id, t.apps.c.id.type), delta).where(delta != 0)
    if froms:
        rows = rows.select_from(*froms)
    return sa.insert(_DELTAS).from_select([_DELTAS.c.app_id, _DELTAS.c.bytes], rows).cte(name)


# Folds every committed delta into app_storage. The apps are locked first (KEY SHARE,
# which writers' own key-share locks do not wait for), skipping an app being deleted:
# its delete holds the app row and would cascade into the deltas this deletes, so
# locking in the other order deadlocks. Two compactors at once: the second's DELETE
# waits for the rows the first deletes and, once that commits, no longer finds them
# (READ COMMITTED re-checks a row it waited for), so nothing is counted twice.
_COMPACT = sa.text(
    """
    WITH locked AS (
        SELECT id FROM apps
        WHERE id IN (SELECT DISTINCT app_id FROM app_storage_deltas)
        FOR KEY SHARE SKIP LOCKED
    ), gone AS (
        DELETE FROM app_storage_deltas d USING locked
        WHERE d.app_id = locked.id
        RETURNING d.app_id, d.bytes
    ), folded AS (
        INSERT INTO app_storage (app_id, bytes)
        SELECT app_id, sum(bytes) FROM gone GROUP BY app_id
        ON CONFLICT (app_id) DO UPDATE SET bytes = app_storage.bytes + excluded.bytes
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM gone) AS deltas, (SELECT count(*) FROM folded) AS apps
    """
)


class PostgresStorageRepo:
    """Reads apps' stored bytes and folds their deltas (see the module)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def usage(
        self, app_ids: Iterable[AppId], *, conn: AsyncConnection | None = None
    ) -> dict[AppId, int]:
        """Each app's stored bytes: compacted plus pending deltas plus its scripts'
        sources (0 for an app that never stored anything, or does not exist). One
        statement, one snapshot."""
        ids = list(dict.fromkeys(app_ids))
        if not ids:
            return {}
        folded = (
            sa.select(t.app_storage.c.bytes)
            .where(t.app_storage.c.app_id == t.apps.c.id)
            .scalar_subquery()
        )
        pending = (
            sa.select(sa.func.sum(_DELTAS.c.bytes))
            .where(_DELTAS.c.app_id == t.apps.c.id)
            .scalar_subquery()
        )
        scripts = (
            sa.select(sa.func.sum(sa.func.octet_length(t.scripts.c.source)))
            .where(t.scripts.c.app_id == t.apps.c.id)
            .scalar_subquery()
        )
        stmt = sa.select(
            t.apps.c.id,
            sa.func.coalesce(folded, 0)
            + sa.func.coalesce(pending, 0)
            + sa.func.coalesce(scripts, 0),
        ).where(t.apps.c.id.in_(ids))
        async with transaction(conn or self._engine) as c:
            rows = (await c.execute(stmt)).all()
        found = {AppId(r[0]): int(r[1]) for r in rows}
        return {app_id: found.get(app_id, 0) for app_id in ids}

    async def compact(self) -> int:
        """Fold the committed deltas into ``app_storage`` in one short READ COMMITTED
        transaction; returns how many delta rows were folded."""
        async with transaction(self._engine, isolation_level="READ COMMITTED") as c:
            row = (await c.execute(_COMPACT)).one()
        return int(row.deltas)
