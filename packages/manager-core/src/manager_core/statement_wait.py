"""How long an HTTP request waits for a PostgreSQL that stopped answering.

A server that hangs without closing its connections (SIGSTOP, a frozen VM or disk, a
network partition) answers nothing and refuses nothing: the kernel keeps ACKing, so
neither TCP nor libpq notices, and a statement already sent waits for ever.

So the wait is bounded inside psycopg's own wait loop, which every exchange (a
statement, ``COMMIT``, ``ROLLBACK``) goes through. Inside :func:`statement_wait` (the
node puts every HTTP request there), a :class:`BoundedConnection` whose statement has
had no answer for ``seconds`` asks PostgreSQL, on a new connection given ``seconds``
too, whether it is working on that statement. No answer, or not working on it (the
statement or its answer was lost on the way): the statement is given up
(:class:`StatementTimeout`) and its connection closed, since what it was in the middle
of is unknown (the pools then discard it). Working on it: the statement is only slow
(a row lock that a running script holds until it ends, a large cascade), and the wait
goes on, asked again every ``seconds``, but never past ``limit`` in all. A flat
bound on statements would have failed those, and a cancelled query is no help: psycopg
then spends up to 10 s trying to cancel it, and commits are shielded from
cancellation on purpose.

The dispatcher and the node's other background tasks run outside any
:func:`statement_wait`: their waits are unchanged (they ride out an outage by
retrying, and an execution may wait on a row lock as long as a script runs).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

import anyio
import attrs
import psycopg
from psycopg.abc import PQGen
from psycopg.conninfo import make_conninfo
from psycopg.errors import _WaitTimeout

from picloud_shared.limits import MAX_TIMEOUT_SECONDS

# How long a request's statement may go without an answer before the node asks
# PostgreSQL whether it is working on it (on a new connection, given as long). A request
# is told 503 within twice this once PostgreSQL stops answering. picloud's statements
# answer in milliseconds; a few seconds of silence is already a stall worth a look, and
# the look costs one connection. Short enough for a 503 well inside a client's or a
# proxy's own 30-60 s timeout, even for a request that queued behind another one's.
STATEMENT_WAIT_SECONDS = 5.0

# The most a statement of a request waits while PostgreSQL does answer: the longest a
# running script holds the rows it locked (its timeout, at most MAX_TIMEOUT_SECONDS),
# and a minute more. Past it the request is told 503 all the same.
STATEMENT_LIMIT_SECONDS = MAX_TIMEOUT_SECONDS + 60.0

T = TypeVar("T")
_BACKEND_STATE = "SELECT state, wait_event FROM pg_stat_activity WHERE pid = %s"


@attrs.frozen
class _Bound:
    seconds: float
    limit: float


_bound: ContextVar[_Bound | None] = ContextVar("picloud_statement_wait", default=None)


class StatementTimeout(psycopg.OperationalError):
    """A statement of a request was given up (see the module's docstring); its
    connection is closed. Whether the server will still run what it had been sent (a
    ``COMMIT``, an autocommitted statement) is unknown."""


@contextmanager
def statement_wait(
    seconds: float = STATEMENT_WAIT_SECONDS, *, limit: float = STATEMENT_LIMIT_SECONDS
) -> Iterator[None]:
    """Bound the waits for PostgreSQL of everything run in this context (this task and
    the tasks it starts) on connections of :class:`BoundedConnection`. A context
    variable, not a connection setting: the engine's connections serve the dispatcher
    too, whose waits stay as they are."""
    token = _bound.set(_Bound(seconds, limit))
    try:
        yield
    finally:
        _bound.reset(token)


class BoundedConnection(psycopg.AsyncConnection[Any]):
    """A psycopg connection whose waits for the server honour :func:`statement_wait`
    (:func:`~manager_core.db.make_engine` and :func:`~manager_core.db.make_pool` make
    only these). The bound is psycopg's own wait timeout, so it holds where
    cancellation cannot reach: a shielded commit, a group commit's shielded flush."""

    async def wait(
        self, gen: PQGen[T], interval: float | None = None, timeout: float | None = None
    ) -> T:
        bound = _bound.get()
        pace = {} if interval is None else {"interval": interval}
        if timeout is not None or bound is None:  # a caller's own timeout (notifies)
            return await super().wait(gen, timeout=timeout, **pace)
        started = time.monotonic()
        while True:
            left = bound.limit - (time.monotonic() - started)
            try:
                # A wait that timed out leaves ``gen`` where it was: waited on again, it
                # gets a None first, which psycopg's generators take for "the wait
                # timed out" and ask to wait again (psycopg.generators' docstring).
                return await super().wait(gen, timeout=max(0.0, min(bound.seconds, left)), **pace)
            except _WaitTimeout:
                if left <= bound.seconds:
                    self._give_up(f"the database did not finish a statement in {bound.limit:g} s")
                try:
                    working = await self._still_working(bound.seconds)
                except BaseException:  # cancelled meanwhile: the statement is still out
                    self.pgconn.finish()
                    raise
                if not working:
                    self._give_up(f"the database did not answer within {bound.seconds:g} s")

    async def _still_working(self, within: float) -> bool:
        """Whether PostgreSQL is working on this connection's statement, asked on a
        new connection within ``within`` seconds: this connection's backend is
        ``active`` (running the statement, or waiting on a lock) and not stuck sending
        its answer (``ClientWrite``: this end of the connection is gone). No answer in
        time, or a backend idle (the statement never came, or its answer was lost) or
        gone: no. A server that refuses the new connection (too many clients, say)
        answers, and cannot tell: yes."""
        password = self.info.password
        conninfo = make_conninfo(
            self.info.dsn,
            connect_timeout=max(2, math.ceil(within)),
            **({"password": password} if password else {}),
        )
        connect = psycopg.AsyncConnection.connect
        with anyio.move_on_after(within):
            try:
                async with await connect(conninfo, autocommit=True) as probe:
                    cursor = await probe.execute(_BACKEND_STATE, (self.info.backend_pid,))
                    row = await cursor.fetchone()
            except psycopg.Error as exc:
                return exc.sqlstate is not None and exc.sqlstate.startswith("53")
            return row is not None and row[0] == "active" and row[1] != "ClientWrite"
        return False

    def _give_up(self, message: str) -> None:
        self.pgconn.finish()  # in an unknown state: the pools must never hand it out
        raise StatementTimeout(message) from None
