"""The access log: one line per HTTP request, when ``PICLOUD_ACCESS_LOG`` is on.

    127.0.0.1:53122 "POST /apps/shop/orders" 202 1.9 ms execution=0b6f…

Logged at INFO on the ``picloud.access`` logger once the request ends: the client,
the method and path, the status (``-`` when no response was started: the client
went away first; 500 when the app failed before answering), the time from the
request's arrival to its end, and, for a user route, the execution the request
became (its record is under the app's ``/executions/{id}``).

What it leaves out, and why:

* the query string: a user route's callers may pass credentials in it (API keys,
  signed links), and an access log is read by more people than the app's members;
* headers and bodies, for the same reason.

The path is the one the client sent, still %-encoded (``scope["raw_path"]``), with
every byte outside printable ASCII written ``\\xNN``: a path cannot start a line of
its own in the log, nor hide in control characters.

Off by default: the line costs each request some CPU, and a busy node writes a lot
of them. Execution records and ``/metrics`` stay the primary record.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from orchestrator_core.routes import EXECUTION_ID_STATE

log = logging.getLogger("picloud.access")

_PRINTABLE = frozenset(range(0x21, 0x7F)) - {ord("\\"), ord('"')}


def printable(raw: bytes) -> str:
    """``raw`` as ASCII, with every other byte, space, quote and backslash as ``\\xNN``."""
    if all(b in _PRINTABLE for b in raw):
        return raw.decode("ascii")
    return "".join(chr(b) if b in _PRINTABLE else f"\\x{b:02x}" for b in raw)


class AccessLog:
    """ASGI middleware writing the access log; lifespan and other scopes pass through."""

    def __init__(self, app: Any, logger: logging.Logger = log) -> None:
        self.app = app
        self.log = logger

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status: list[int] = []

        async def send_and_note(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except BaseException:
            if not status:
                status.append(500)  # what the HTTP server answers for it
            raise
        finally:
            self._write(scope, status[0] if status else None, time.perf_counter() - started)

    def _write(self, scope: dict[str, Any], status: int | None, seconds: float) -> None:
        client = scope.get("client")
        who = f"{client[0]}:{client[1]}" if client else "-"
        raw_path = scope.get("raw_path") or scope.get("path", "").encode("utf-8")
        execution = (scope.get("state") or {}).get(EXECUTION_ID_STATE)
        self.log.info(
            '%s "%s %s" %s %.1f ms%s',
            who,
            printable(scope.get("method", "-").encode("ascii", "replace")),
            printable(raw_path),
            "-" if status is None else status,
            seconds * 1000,
            "" if execution is None else f" execution={execution}",
        )
