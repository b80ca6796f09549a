"""Logging a background task's failures while the database is away, without a flood.

A loop that retries every poll interval (the dispatcher's claims) meets the same
failure again and again while PostgreSQL is down: a traceback each time would be
thousands of lines an hour, all alike. :class:`OutageLog` writes one line when such
an outage starts, one a minute (``OUTAGE_LOG_SECONDS``) while it lasts with how many
times it failed, and one when the loop works again. A failure that is not the
database being away (``db.is_unavailable``) is logged with its traceback, every time:
that is a bug to see.

The same goes for failures that are not a loop's but many tasks' (each outbox row a
dispatcher runs, each refused admin request): one :class:`OutageLog` for all of them,
:meth:`OutageLog.counted` in each ``except`` block, and the caller's own line (with its
traceback) for what it does not count.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from manager_core.db import is_unavailable, unavailable_message

OUTAGE_LOG_SECONDS = 60.0


class OutageLog:
    """The failures of one retried operation (``what``, e.g. "claiming outbox rows").

    ``then`` says what happens after a failure ("retrying after the poll interval",
    "next try in 5 s"); ``every``: how often, at most, a lasting outage is logged."""

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        *,
        then: str = "retrying after the poll interval",
        every: float = OUTAGE_LOG_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._what = what
        self._then = then
        self._every = every
        self._clock = clock
        self._since: float | None = None  # when the current outage began
        self._logged = 0.0
        self._failures = 0

    def failed(self, exc: BaseException) -> None:
        """One failure; call it from the ``except`` block that caught ``exc``."""
        if not self.counted(exc):
            self._log.exception("%s failed; %s", self._what, self._then)

    def counted(self, exc: BaseException) -> bool:
        """Whether ``exc`` is the database being away: then it is counted in the
        outage (and logged as its lines allow: no traceback). Anything else is not
        logged here: the caller logs it, with its traceback."""
        if not is_unavailable(exc):
            return False
        now = self._clock()
        self._failures += 1
        if self._since is None:
            self._since = self._logged = now
            self._log.warning(
                "%s failed: %s; %s (logged again %s while it lasts)",
                self._what,
                unavailable_message(exc),
                self._then,
                "once a minute" if self._every == 60 else f"at most once per {self._every:g} s",
            )
        elif now - self._logged >= self._every:
            self._logged = now
            self._log.warning(
                "%s still fails: %d times in %.0f s (%s)",
                self._what,
                self._failures,
                now - self._since,
                unavailable_message(exc),
            )
        return True

    def succeeded(self) -> None:
        """The operation worked: the outage, if there was one, is over."""
        if self._since is None:
            return
        self._log.info(
            "%s works again, after %d failures in %.0f s",
            self._what,
            self._failures,
            self._clock() - self._since,
        )
        self._since, self._failures = None, 0


__all__ = ["OUTAGE_LOG_SECONDS", "OutageLog"]
