"""Logging a background task's failures while the database is away, without a flood.

A loop that retries every poll interval (the dispatcher's claims) meets the same
failure again and again while PostgreSQL is down: a traceback each time would be
thousands of lines an hour, all alike. :class:`OutageLog` writes one line when such
an outage starts, one a minute (``OUTAGE_LOG_SECONDS``) while it lasts with how many
times it failed, and one when the loop works again. A failure that is not the
database being away (``db.is_unavailable``) is logged with its traceback, every time:
that is a bug to see.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from manager_core.db import is_unavailable, unavailable_message

OUTAGE_LOG_SECONDS = 60.0


class OutageLog:
    """The failures of one retried operation (``what``, e.g. "claiming outbox rows")."""

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        *,
        every: float = OUTAGE_LOG_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._what = what
        self._every = every
        self._clock = clock
        self._since: float | None = None  # when the current outage began
        self._logged = 0.0
        self._failures = 0

    def failed(self, exc: BaseException) -> None:
        """One failure; call it from the ``except`` block that caught ``exc``."""
        if not is_unavailable(exc):
            self._log.exception("%s failed; retrying after the poll interval", self._what)
            return
        now = self._clock()
        self._failures += 1
        if self._since is None:
            self._since = self._logged = now
            self._log.warning(
                "%s failed: %s; retrying (logged again once a minute while it lasts)",
                self._what,
                unavailable_message(exc),
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
