"""Supervision of the embedded PostgreSQL while ``picloud serve`` runs.

Without it, a PostgreSQL killed under a running node (the OOM killer, an operator's
stray ``kill``) left the node up and answering 503 for ever. The watch checks the
server every ``PG_WATCH_INTERVAL_SECONDS``; when it finds it gone it logs the end of
the server's log and starts it again, where it listened before (PostgreSQL replays
its WAL: nothing committed is lost). The node's connection pools reconnect by
themselves; requests during the gap are answered 503 ``unavailable``, and claimed
outbox rows come back when their lease expires, as after any crash.

A server that keeps dying is not restarted for ever: after ``max_restarts``
restarts within ``PG_RESTART_WINDOW_SECONDS`` (``PICLOUD_EMBEDDED_PG_RESTARTS``,
default ``PG_MAX_RESTARTS``; ``0`` never restarts), or when it cannot be started
again for ``PG_RESTART_GIVE_UP_SECONDS``, the watch gives up and calls ``on_lost``
(which stops ``picloud serve`` with exit status 1, for a service manager to act on).

A thread, not a task: starting PostgreSQL is a blocking ``pg_ctl`` call, and the
watch must keep working while the event loop is busy.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from picloud.embedded_pg import reap_dead_children

log = logging.getLogger("picloud.pg_watch")

PG_WATCH_INTERVAL_SECONDS = 1.0
PG_MAX_RESTARTS = 5
PG_RESTART_WINDOW_SECONDS = 600.0
PG_RESTART_GIVE_UP_SECONDS = 60.0


class Supervised(Protocol):
    """What the watch needs of the server (``EmbeddedPostgres``)."""

    def alive(self) -> bool: ...

    def restart(self) -> None: ...

    def log_tail(self, lines: int = 40) -> str: ...


class PgWatch:
    """Restarts a supervised PostgreSQL that died; see the module docstring."""

    def __init__(
        self,
        pg: Supervised,
        on_lost: Callable[[str], None],
        *,
        interval: float = PG_WATCH_INTERVAL_SECONDS,
        max_restarts: int = PG_MAX_RESTARTS,
        window: float = PG_RESTART_WINDOW_SECONDS,
        give_up_after: float = PG_RESTART_GIVE_UP_SECONDS,
    ) -> None:
        self._pg = pg
        self._on_lost = on_lost
        self._interval = interval
        self._max_restarts = max_restarts
        self._window = window
        self._give_up_after = give_up_after
        self._restarted_at: deque[float] = deque()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.restarts = 0
        self.lost: str | None = None  # why the watch gave up

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="picloud-pg-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching (before the server is stopped on purpose); waits for a
        restart in progress to end."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            if self._pg.alive():
                continue
            reap_dead_children("postgres")  # its pid must not outlive it, restarted or not
            why = self._recover()
            if why is not None:
                self.lost = why
                log.critical("embedded PostgreSQL: %s; stopping", why)
                self._on_lost(why)
                return

    def _recover(self) -> str | None:
        """Start the server again; why not, when giving up (``None`` once it runs)."""
        log.error(
            "embedded PostgreSQL is not running; starting it again. Its log ends with:\n%s",
            self._pg.log_tail(10),
        )
        now = time.monotonic()
        while self._restarted_at and now - self._restarted_at[0] > self._window:
            self._restarted_at.popleft()
        if len(self._restarted_at) >= self._max_restarts:
            if self._max_restarts == 0:
                return "it stopped, and restarting it is off (PICLOUD_EMBEDDED_PG_RESTARTS=0)"
            return (
                f"it stopped again after {len(self._restarted_at)} restarts within "
                f"{self._window:g} s"
            )
        deadline = now + self._give_up_after
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self._pg.restart()
            except Exception as exc:  # EmbeddedPostgresError, or an OSError of pg_ctl
                first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
                if time.monotonic() >= deadline:
                    log.error("embedded PostgreSQL did not start: %s", exc)
                    return (
                        f"it could not be started again within {self._give_up_after:g} s"
                        f" ({first_line})"
                    )
                log.warning("embedded PostgreSQL did not start (%s); trying again", first_line)
                self._stop.wait(self._interval)
                continue
            self.restarts += 1
            self._restarted_at.append(time.monotonic())
            log.warning(
                "embedded PostgreSQL is running again (started in %.1f s)",
                time.monotonic() - started,
            )
            return None
        return None
