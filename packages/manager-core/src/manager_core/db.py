"""Engine and transaction plumbing shared by every Postgres adapter.

Every repository method takes a ``bind``: either an ``AsyncEngine`` (the method
opens and commits its own transaction) or an ``AsyncConnection`` already inside a
transaction owned by the caller (the method joins it and never commits). That is
how a script's KV write, the outbox rows it fans out and its execution record
commit together.

Commits and rollbacks run under ``CancelScope(shield=True)`` so a cancelled task
never leaves a transaction half finished.

Connections made here are of :class:`~manager_core.statement_wait.BoundedConnection`:
inside :func:`~manager_core.statement_wait.statement_wait` (the node puts every HTTP
request there) a PostgreSQL that stops answering costs a statement a bounded wait,
shielded commits included.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any, TypeAlias, TypeVar

import anyio
import psycopg
from psycopg.rows import namedtuple_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError
from sqlalchemy.exc import TimeoutError as SaPoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from manager_core.statement_wait import BoundedConnection, StatementTimeout
from picloud_shared.errors import Conflict, InvalidInput, PicloudError, Unavailable

Bind: TypeAlias = AsyncEngine | AsyncConnection

# SQLSTATEs we translate (https://www.postgresql.org/docs/current/errcodes-appendix.html)
UNIQUE_VIOLATION = "23505"
FOREIGN_KEY_VIOLATION = "23503"
CHECK_VIOLATION = "23514"
NOT_NULL_VIOLATION = "23502"
SERIALIZATION_FAILURE = "40001"
DEADLOCK_DETECTED = "40P01"
# The server ended the session: a shutdown or crash (57P01-57P03), an idle transaction
# past idle_in_transaction_session_timeout (25P03). Class 08 is a connection exception.
SESSION_ENDED = frozenset({"57P01", "57P02", "57P03", "25P03"})
log = logging.getLogger("picloud.db")
CONFLICT_ATTEMPTS = 5  # runs of a transaction PostgreSQL aborts for a conflict
T = TypeVar("T")


# Every connection picloud opens plans with sequential scans disabled (the planner
# still uses one where no index can serve the query). Two reasons, both measured:
# * psycopg prepares a statement once it has run five times, and PostgreSQL then keeps
#   a generic plan made for the table as it was. The outbox is a queue, empty most of
#   the time: a lookup by id planned on an empty outbox is a sequential scan, and it
#   stayed one (until the next analyze, up to minutes) while a backlog of thousands
#   drained, one full scan per statement — a 45 s drain of 4000 rows in the HTTP
#   benchmark (tests/manager/test_outbox_plans.py).
# * Executions run SERIALIZABLE, and a sequential scan takes a predicate lock on the
#   whole table: concurrent executions then conflict (and re-run) on rows they never
#   shared. PostgreSQL's documentation advises encouraging index scans for that.
SESSION_OPTIONS = "-c enable_seqscan=off"

# How long anything waits for a database connection: a free one from a pool, or a new
# one from the server. Past it the database counts as unavailable (503 on the HTTP
# side). The libraries' default (30 s) held requests for 30-60 s while PostgreSQL was
# away, and a stop on SIGTERM as long.
CONNECTION_WAIT_SECONDS = 5

# How long the outbox pool (``make_pool``) keeps at one attempt to open a connection.
# psycopg_pool tries again after 1 s, then 2, 4 … s, for ``reconnect_timeout`` (300 s
# by default), and while an attempt waits out its pause no request can start another:
# after an outage of a minute or two, the pool served again 20-100 s after PostgreSQL
# did. With this bound an attempt fails after two tries a second apart, and the next
# request for a connection starts a new one (so does a request still waiting then:
# ``_reconnect_failed``): once PostgreSQL answers, the pool serves within about a second.
RECONNECT_SECONDS = 1.0


def _with_options(url: str, options: str | None) -> dict[str, str | int]:
    """Connection arguments setting ``options`` and a connect timeout
    (``CONNECTION_WAIT_SECONDS``); a URL that sets its own keeps them."""
    args: dict[str, str | int] = {}
    if options is not None and "options=" not in url:
        args["options"] = options
    if "connect_timeout=" not in url:
        args["connect_timeout"] = CONNECTION_WAIT_SECONDS
    return args


def make_engine(
    url: str,
    *,
    pool_size: int = 10,
    max_overflow: int = 5,
    session_options: str | None = SESSION_OPTIONS,
    **kwargs: object,
) -> AsyncEngine:
    """An async engine for ``postgresql+psycopg://`` URLs (plain ``postgresql://`` is
    accepted); its connections are of :class:`BoundedConnection` and get
    ``session_options`` (:data:`SESSION_OPTIONS`)."""
    if url.startswith(("postgresql://", "postgres://")):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_pre_ping=False,
        pool_timeout=CONNECTION_WAIT_SECONDS,
        connect_args={
            "async_creator_fn": BoundedConnection.connect,
            **_with_options(url, session_options),
        },
        **kwargs,
    )


def make_pool(url: str, *, max_size: int, min_size: int = 1) -> AsyncConnectionPool:
    """A pool of plain psycopg connections in autocommit, for the hot single-statement
    paths (the outbox's enqueue, claim and completion): no BEGIN/COMMIT round trips
    and none of the per-checkout cost of the SQLAlchemy pool. Not opened yet:
    ``await pool.open()``, and ``await pool.close()`` when done."""
    if "://" in url:
        scheme, rest = url.split("://", 1)
        url = "postgresql://" + rest if scheme.startswith("postgres") else url
    return AsyncConnectionPool(
        url,
        min_size=min(min_size, max_size),
        max_size=max_size,
        kwargs={"autocommit": True, "row_factory": namedtuple_row}
        | _with_options(url, SESSION_OPTIONS),
        connection_class=BoundedConnection,
        timeout=CONNECTION_WAIT_SECONDS,
        reconnect_timeout=RECONNECT_SECONDS,
        reconnect_failed=_reconnect_failed,
        open=False,
    )


async def _reconnect_failed(pool: AsyncConnectionPool) -> None:
    """An attempt of ``pool`` to open a connection gave up (``RECONNECT_SECONDS``):
    while requests still wait for one, start a new attempt at once rather than at the
    next request (``check`` grows a pool that has no connection)."""
    if not pool.closed and pool.get_stats().get("requests_waiting", 0):
        await pool.check()


INTEGRITY_ERRORS = (IntegrityError, psycopg.IntegrityError)
"""A constraint violation, through SQLAlchemy or on a plain psycopg connection."""

ROW_ERRORS = (*INTEGRITY_ERRORS, DataError, psycopg.DataError, ValueError, RecursionError)
"""What one bad row can make a whole batched statement fail with: a constraint
violation, a value PostgreSQL refuses (class 22), or one that is not JSON (or too
deep to serialize). A
batch that fails so is retried row by row, so only that row fails."""


SqlConn: TypeAlias = AsyncConnection | psycopg.AsyncConnection[Any]
"""Where plain SQL (``%(name)s`` parameters) runs: a SQLAlchemy connection (joining
its transaction) or a psycopg connection from :func:`make_pool`."""


async def fetch(conn: SqlConn, sql: str, params: Mapping[str, Any]) -> Sequence[Any]:
    """All rows of ``sql`` (attribute access by column name on either kind of conn)."""
    if isinstance(conn, AsyncConnection):
        return (await conn.exec_driver_sql(sql, dict(params))).all()
    cur = await conn.execute(sql, params)  # type: ignore[arg-type]
    return await cur.fetchall()


async def execute(
    conn: SqlConn, sql: str, params: Mapping[str, Any], *, prepare: bool | None = None
) -> int:
    """Run ``sql``; the number of rows it affected. ``prepare=False`` plans it afresh
    on every run on a psycopg connection (see psycopg's ``prepare_threshold``)."""
    if isinstance(conn, AsyncConnection):
        return (await conn.exec_driver_sql(sql, dict(params))).rowcount
    cur = await conn.execute(sql, params, prepare=prepare)  # type: ignore[arg-type]
    return cur.rowcount


async def shielded_commit(conn: AsyncConnection) -> None:
    """Commit, even if the calling task is being cancelled."""
    with anyio.CancelScope(shield=True):
        await conn.commit()


async def shielded_rollback(conn: AsyncConnection) -> None:
    """Roll back, even if the calling task is being cancelled."""
    with anyio.CancelScope(shield=True):
        await conn.rollback()


@asynccontextmanager
async def transaction(
    bind: Bind, *, isolation_level: str | None = None
) -> AsyncIterator[AsyncConnection]:
    """Join the caller's transaction (``bind`` is a connection) or run a new one.

    A new transaction commits when the block ends normally and rolls back on any
    exception, both shielded from cancellation.
    """
    if isinstance(bind, AsyncConnection):
        yield bind
        return
    async with bind.connect() as conn:
        if isolation_level is not None:
            await conn.execution_options(isolation_level=isolation_level)
        await conn.begin()
        try:
            yield conn
        except BaseException:
            await shielded_rollback(conn)
            raise
        await shielded_commit(conn)


async def in_transaction(
    bind: Bind,
    body: Callable[[AsyncConnection], Awaitable[T]],
    *,
    attempts: int = CONFLICT_ATTEMPTS,
) -> T:
    """``body`` in the caller's transaction, or in a new one that is run again (after a
    short random pause) when PostgreSQL aborts it for a deadlock or a serialization
    failure. An admin delete meets running executions that way: it cascades into rows
    their transactions hold, while they lock rows it is about to delete."""
    if isinstance(bind, AsyncConnection):
        return await body(bind)
    for attempt in range(attempts):
        try:
            async with transaction(bind) as conn:
                return await body(conn)
        except DBAPIError as exc:
            if not is_retryable_conflict(exc) or attempt == attempts - 1:
                raise
            log.info("transaction re-run after a conflict: %s", str(exc.orig).replace("\n", " "))
        await conflict_pause(attempt)
    raise AssertionError("unreachable")


def sqlstate(exc: BaseException) -> str | None:
    """The PostgreSQL SQLSTATE behind a SQLAlchemy/psycopg error, if any."""
    orig = getattr(exc, "orig", exc)
    return getattr(orig, "sqlstate", None)


def constraint_name(exc: BaseException) -> str | None:
    """The name of the violated constraint, if PostgreSQL reported one."""
    orig = getattr(exc, "orig", exc)
    diag = getattr(orig, "diag", None)
    return getattr(diag, "constraint_name", None)


def is_retryable_conflict(exc: BaseException) -> bool:
    """A serialization failure or deadlock (through SQLAlchemy or on a plain psycopg
    connection): the transaction may simply be re-run."""
    return isinstance(exc, (DBAPIError, psycopg.Error)) and sqlstate(exc) in (
        SERIALIZATION_FAILURE,
        DEADLOCK_DETECTED,
    )


def is_unavailable(exc: BaseException) -> bool:
    """The database could not be reached or dropped the connection (not a conflict,
    not a refused statement): the operation may be tried again later."""
    if is_retryable_conflict(exc):
        return False
    if isinstance(exc, SaPoolTimeout):  # no engine connection came free in time
        return True
    orig = getattr(exc, "orig", exc)
    return isinstance(orig, (psycopg.OperationalError, PoolTimeout)) and not isinstance(
        orig, psycopg.errors.QueryCanceled
    )


def is_connection_lost(exc: BaseException) -> bool:
    """The connection a statement ran on is gone (PostgreSQL restarted or ended the
    session, the socket broke): SQLAlchemy found it so and invalidated it, or a plain
    psycopg connection failed without a server error (or with one that ends the
    session). Nothing of its transaction committed. Not a statement PostgreSQL
    refused, a conflict, or a cancelled or given-up statement."""
    if isinstance(exc, DBAPIError):
        return bool(exc.connection_invalidated)
    if not isinstance(exc, psycopg.Error) or isinstance(exc, StatementTimeout):
        return False
    state = exc.sqlstate
    if state is None:
        return isinstance(exc, psycopg.OperationalError)
    return state.startswith("08") or state in SESSION_ENDED


def unavailable_message(exc: BaseException) -> str:
    """What a client is told of an error :func:`is_unavailable` accepts: why a
    statement was given up (:class:`~manager_core.statement_wait.StatementTimeout`),
    else that the database is unavailable."""
    orig = getattr(exc, "orig", exc)
    if isinstance(orig, StatementTimeout):
        return str(orig)
    return "the database is unavailable"


async def conflict_pause(attempt: int) -> None:
    """The random pause before re-running a transaction aborted for a conflict."""
    await anyio.sleep(random.uniform(0, 0.005 * 2**attempt))


async def run_batch(
    batch: list[T],
    run: Callable[[list[T]], Awaitable[None]],
    fail: Callable[[list[T], Exception], None],
) -> None:
    """``run`` a group commit's batched statement so that neither a conflict nor one
    bad row costs the others. A statement PostgreSQL aborted for a deadlock or a
    serialization failure had no effect: it runs again. One that failed for a row's
    sake (``ROW_ERRORS``) runs again row by row, so only that row fails. Anything
    else fails the batch (``fail`` is called while the error is being handled)."""
    for attempt in range(CONFLICT_ATTEMPTS):
        try:
            await run(batch)
            return
        except Exception as exc:
            if not (is_retryable_conflict(exc) and attempt < CONFLICT_ATTEMPTS - 1):
                if len(batch) == 1 or not isinstance(exc, ROW_ERRORS):
                    fail(batch, exc)
                    return
                break
        await conflict_pause(attempt)
    for item in batch:  # isolate the row at fault; the others are written
        await run_batch([item], run, fail)


@contextmanager
def unavailable_as_error() -> Iterator[None]:
    """Turn a database out of reach into ``Unavailable`` (a 503), for callers that know
    no database errors (the orchestrator, through ``OutboxWriter`` and ``RouteTable``)."""
    try:
        yield
    except Exception as exc:
        if is_unavailable(exc):
            raise Unavailable(unavailable_message(exc)) from exc
        raise


def translate_integrity_error(
    exc: IntegrityError, *, what: str = "resource", foreign_key: PicloudError | None = None
) -> PicloudError:
    """Map a constraint violation to the public error a client should see.

    A foreign-key violation means "still referenced" on delete but "refers to a
    missing row" on insert; pass ``foreign_key`` to say which one the caller meant
    (default: ``Conflict``).
    """
    state = sqlstate(exc)
    name = constraint_name(exc) or "constraint"
    if state == UNIQUE_VIOLATION:
        return Conflict(f"{what} already exists")
    if state == FOREIGN_KEY_VIOLATION:
        return foreign_key or Conflict(f"{what} is still referenced ({name})")
    if state in (CHECK_VIOLATION, NOT_NULL_VIOLATION):
        return InvalidInput(f"{what} violates {name}")
    return PicloudError()
