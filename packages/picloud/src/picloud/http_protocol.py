"""uvicorn's httptools protocol, with a bound on the size and time of each request head.

uvicorn (0.54) bounds neither: its keep-alive timer starts only once a response is
sent and stops at the first byte of the next request (a new connection has none),
and httptools buffers a header line of any length. A client sending one header byte
a second would hold one of the ``PICLOUD_MAX_CONNECTIONS`` for ever, and one long
header line would cost its size in memory before picloud's own 431 could look at it.

:class:`BoundedHttpToolsProtocol` counts the bytes of each request's head (request
line and headers) as they arrive, and times it:

* past ``MAX_REQUEST_HEAD_BYTES`` it answers 431 ``headers_too_large`` and closes
  the connection, feeding the parser nothing more (a response still in progress on
  the connection is sent first);
* a head not whole ``HEAD_READ_TIMEOUT_SECONDS`` after the connection opened, or
  after the previous response on it ended, is answered 408 ``request_timeout`` and
  the connection closed; when nothing of a request has come it is just closed.

``PICLOUD_MAX_CONNECTIONS`` (uvicorn's ``limit_concurrency``) bounds the open
connections. A connection that would take the node past it first makes room: the
connection that has waited longest for a request head (an idle keep-alive one, or
one whose head trickles in) is closed. So clients that open connections and send
nothing, or a byte at a time, cannot lock others out: each new connection closes the
oldest of theirs. Only when every connection is busy with a request does a request
past the limit get picloud's error body: 503 ``unavailable`` with ``Retry-After``,
not uvicorn's plain-text ``Service Unavailable``.

All these answers carry the usual error body and ``Connection: close``. A head that
starts in the same read as the end of the previous request (pipelining) is counted
from the next read: it may run past the limit by at most one read (256 KB).

It overrides uvicorn's parser callbacks, which are internals: pyproject.toml pins
the uvicorn versions it is tested against, and ``tests/app/test_http_protocol.py``
checks that the methods and attributes it relies on keep their shape.
"""

from __future__ import annotations

import asyncio
import http
import json
import time

from uvicorn._types import ASGI3Application, ASGIReceiveCallable, ASGISendCallable, Scope
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from picloud_shared.limits import HEAD_READ_TIMEOUT_SECONDS, MAX_REQUEST_HEAD_BYTES

__all__ = ["BoundedHttpToolsProtocol", "too_many_connections"]

TOO_MANY_CONNECTIONS_RETRY_AFTER = b"1"  # seconds


async def too_many_connections(
    scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
) -> None:
    """The answer to a request on a connection past the limit (uvicorn closes it)."""
    body = _error_body(
        "unavailable", "this node has as many open connections as it serves; retry later"
    )
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(body)),
                (b"retry-after", TOO_MANY_CONNECTIONS_RETRY_AFTER),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}, separators=(",", ":")).encode()


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` whose request heads are bounded in bytes and in time.

    Pass the class as ``uvicorn.Config(http=...)``; a subclass may lower the bounds.
    """

    max_head_bytes: int = MAX_REQUEST_HEAD_BYTES
    head_read_timeout_seconds: float = HEAD_READ_TIMEOUT_SECONDS

    # Per connection; (re)set in connection_made, so __init__ stays uvicorn's.
    _awaiting_head = True  # from the end of a request (or the start) to its next head's end
    _head_bytes = 0  # of the head awaited, so far
    _head_timer: asyncio.TimerHandle | None = None
    _awaiting_since = 0.0  # monotonic: when the head awaited began to be awaited
    _refused = False  # the head is past the limit: its 431 is sent or waits its turn

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._awaiting_head, self._head_bytes, self._refused = True, 0, False
        self._start_head_timer()
        self._make_room()

    def _make_room(self) -> None:
        """Past the connection limit, close the connections that have waited longest
        for a request head until this one fits (or none is left waiting)."""
        limit = self.limit_concurrency
        if limit is None or len(self.connections) < limit:
            return
        waiting = sorted(
            (
                c
                for c in self.connections
                if c is not self and isinstance(c, BoundedHttpToolsProtocol) and c._evictable()
            ),
            key=lambda c: c._awaiting_since,
        )
        for victim in waiting[: len(self.connections) - limit + 1]:
            victim._evict()

    def _evictable(self) -> bool:
        """Waiting for a request head, with nothing in progress."""
        return (
            self._awaiting_head
            and not self._refused
            and self._idle()
            and not self.transport.is_closing()
        )

    def _evict(self) -> None:
        self._stop_head_timer()
        self.connections.discard(self)  # at once: the limit is checked before it is lost
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        # While a head is awaited, feed the parser no more than it may still hold:
        # a head still not whole after that is too large.
        while self._awaiting_head and self._head_bytes + len(data) > self.max_head_bytes:
            room = self.max_head_bytes - self._head_bytes
            if room:
                self._head_bytes += room
                super().data_received(data[:room])
                data = data[room:]
                if self.transport.is_closing() or self.transport.get_protocol() is not self:
                    return  # a bad request (400) or a WebSocket upgrade
            if self._awaiting_head:
                self._refuse_head()
                return
        if self._awaiting_head:
            self._head_bytes += len(data)
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._awaiting_head = False
        self._stop_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._awaiting_head, self._head_bytes = True, 0

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing() or not self._idle():
            return  # closed, or a pipelined request's turn
        if self._refused:
            self._answer_and_close(*self._head_too_large())
        else:
            self._start_head_timer()

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        if app is service_unavailable:  # past limit_concurrency
            app = too_many_connections
        super()._start_asgi_task(cycle, app)

    def _idle(self) -> bool:
        """No response is in progress or waiting its turn on this connection."""
        return self.cycle is None or self.cycle.response_complete

    def _refuse_head(self) -> None:
        self._refused = True
        self._stop_head_timer()
        if self._idle():
            self._answer_and_close(*self._head_too_large())
        else:  # answered after the responses in progress (on_response_complete)
            self.flow.pause_reading()

    def _head_too_large(self) -> tuple[int, str, str]:
        return (
            431,
            "headers_too_large",
            f"the request line and headers are larger than {self.max_head_bytes} bytes",
        )

    def _start_head_timer(self) -> None:
        self._stop_head_timer()
        self._awaiting_since = time.monotonic()
        self._head_timer = self.loop.call_later(
            self.head_read_timeout_seconds, self._head_timed_out
        )

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or not self._idle():
            return
        if self._awaiting_head and self._head_bytes:
            self._answer_and_close(
                408,
                "request_timeout",
                "the request line and headers did not arrive within "
                f"{self.head_read_timeout_seconds:g} s",
            )
        else:  # nothing of a request came (or only the rest of an answered one's body)
            self.transport.close()

    def _answer_and_close(self, status: int, code: str, message: str) -> None:
        body = _error_body(code, message)
        head = [b"HTTP/1.1 %d %s\r\n" % (status, http.HTTPStatus(status).phrase.encode())]
        for name, value in self.server_state.default_headers:
            head.append(b"%s: %s\r\n" % (name, value))
        head.append(
            b"content-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n" % len(body)
        )
        self.transport.write(b"".join(head) + body)
        self.transport.close()
