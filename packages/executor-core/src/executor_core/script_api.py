"""The ``ctx`` object a script sees, inside the worker (API.md, "Scripts").

Every ``ctx.kv``/``ctx.docs`` call is one ``call`` frame to the host and one
``ret``/``err`` frame back, while the execution the ``ctx`` was made for runs
(afterwards it raises ``execution_ended`` in the worker); a host error is
re-raised here as the matching :class:`picloud_shared.errors.PicloudError`
subclass (``.code``, ``.message``), so a script can catch it. Logs (``ctx.log``
and ``print``) travel as one-way ``log`` frames, capped per execution.

Standard library (plus the two tiny ``picloud_shared`` modules) only: the worker
bootstrap imports this module. A call too big for a frame is the exception: it is
answered in the worker by the host's own checks (``host_bridge``, imported then).
"""

from __future__ import annotations

import _thread
import binascii
import io
import os
import re
import sys
from time import perf_counter
from typing import TYPE_CHECKING

from executor_core import frames
from picloud_shared.limits import MAX_LOG_BYTES, MAX_RESPONSE_BYTES
from picloud_shared.responses import header_problem, headers_problem, status_problem

if TYPE_CHECKING:
    from typing import Any


class HostError(Exception):
    """A host-API call failed: ``code`` and ``message`` as in the API's error shape.

    Each ``picloud_shared.errors`` code arrives as its own subclass of this
    (``ctx.errors["not_found"]``, named like the host class, e.g. ``NotFound``).
    """

    code = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


_ERRORS_BY_CODE: dict[str, type[HostError]] = {}


def error_class(code: str) -> type[HostError]:
    """The script-side class for a host error code (made once per code)."""
    cls = _ERRORS_BY_CODE.get(code)
    if cls is None:
        name = "".join(part.capitalize() for part in code.split("_")) or "HostError"
        cls = type(name, (HostError,), {"code": code, "__module__": "picloud"})
        _ERRORS_BY_CODE[code] = cls
    return cls


class Rejected(BaseException):
    """Raised by ``ctx.reject``: the request is refused (422, never retried)."""


class OutputLimit(BaseException):
    """The execution logged or printed more than its cap."""


class CpuLimit(BaseException):
    """The execution used up its CPU time (RLIMIT_CPU, SIGXCPU)."""


class InvalidReturn(Exception):
    """``handle`` returned something that is not a response."""


class ResponseTooLarge(BaseException):
    """The response body is over the cap."""


ENDED = "execution_ended"
ENDED_MESSAGE = (
    "this execution has ended: its ctx reaches the host no more "
    "(a thread or a global outlived it; use the ctx handle() is given)"
)


def safe_text(text: str) -> str:
    """``text`` as UTF-8 can carry it: half a surrogate pair becomes U+FFFD.

    For diagnostic text only (messages, tracebacks, log lines); data is refused
    instead, never altered."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text


def describe(value: object) -> str:
    """``str(value)`` for a diagnostic, whatever the script made of ``__str__``: one
    that raises or returns no ``str`` gives ``<unprintable Name>``."""
    try:
        text = str(value)
    except BaseException:  # the script's own __str__: nothing of it may escape
        text = None
    if type(text) is not str:
        try:
            name = type(value).__name__
        except BaseException:
            name = "object"
        return f"<unprintable {name if type(name) is str else 'object'}>"
    return text


def oversized_call(op: str, args: tuple[Any, ...]) -> HostError:
    """The error for a host call whose frame would be over ``frames.MAX_FRAME_BYTES``:
    the one the host answers an argument over its limit with (the host's own checks,
    run here: a key or id is ``limit_exceeded``, a value or document
    ``payload_too_large``), else ``limit_exceeded``."""
    from executor_core.host_bridge import argument_error  # rarely needed: not at start

    found = argument_error(op, list(args))
    if found is not None:
        return error_class(found[0])(found[1])
    return error_class("limit_exceeded")(
        f"ctx.{op.replace('_', '.', 1)}: a host call's arguments are at most "
        f"{frames.MAX_FRAME_BYTES} bytes as JSON"
    )


REPLY, NEXT_EXEC = 0, 1  # the two kinds of wait


class FrameTooBig(Exception):
    """A frame from the host does not fit in the memory limit once decoded (an event
    whose objects outgrow ``memory_limit_mb``); ``nonce`` is its execution's."""

    def __init__(self, nonce: str) -> None:
        super().__init__(nonce)
        self.nonce = nonce


_NONCE = re.compile(rb'"n":"([0-9a-f]{1,64})"')


def _too_big(raw: bytes | bytearray) -> BaseException:
    """What a frame that ran out of memory while decoded raises: ``FrameTooBig`` with
    its nonce (in the frame's first bytes, where the host writes it), else the
    ``MemoryError`` itself."""
    found = _NONCE.search(raw, 0, 200)
    return MemoryError() if found is None else FrameTooBig(found.group(1).decode("ascii"))


class Channel:
    """The worker's end of the pipes, for one execution at a time.

    Waiting for the host (a call's reply, the next ``exec``) may busy-poll the pipe
    for up to ``spin`` seconds before a blocking read: a sleeping process costs a
    wake-up (tens of µs on a VM) that a polling one does not. The host sets the
    window in every frame it sends (``s``, µs; 0 when executions already compete
    for the CPUs), and each kind of wait polls only if polling would have caught
    the previous one (the host answered within the window): a worker idle between
    sparse requests, or waiting on a slow host call, sleeps at once. How long the
    host took is told by its send time in the frame (``ts``; ``perf_counter`` is
    CLOCK_MONOTONIC, one clock for all processes), not by the worker's own clock,
    which would include the wake-up polling is there to save. The frame before a
    wait tells the host whether the worker will poll (``sp``) and when it was sent
    (``ts``), so the host can make the same choice.
    """

    def __init__(self, rfd: int, wfd: int) -> None:
        self.rfd = rfd
        self.wfd = wfd
        self.nonce = ""
        self._seq = 0
        self._lock = _thread.allocate_lock()
        self.log_bytes = 0
        self._buf = bytearray()
        self.spin = 0.0  # seconds; from the host's last frame
        self._polling = False  # rfd is non-blocking (set so by a poll)
        self.waits = [0.0, 0.0]  # how long the host took to answer, per kind (seconds)

    def set_spin(self, frame: dict[str, Any]) -> None:
        us = frame.get("s")
        self.spin = us / 1e6 if type(us) is int and 0 < us <= 1000 else 0.0

    def will_spin(self, kind: int) -> bool:
        """Whether the next wait of this kind polls before it sleeps."""
        return self.spin > 0 and self.waits[kind] <= self.spin

    def read_frame(self, kind: int = REPLY) -> dict[str, Any] | None:
        """The next host frame (usually one ``read`` syscall); ``None`` at end of file."""
        buf = self._buf
        started = 0.0
        while True:
            need = 4 + int.from_bytes(buf[:4], "big") if len(buf) >= 4 else 5
            if len(buf) >= need:
                try:
                    body = bytes(buf[4:need])
                    del buf[:need]
                    frame = frames.decode(body)
                except MemoryError:
                    if kind != NEXT_EXEC:  # a reply: the script's call raises it
                        raise
                    raise _too_big(buf if len(buf) >= need else body) from None
                if started:
                    sent = frame.get("ts")
                    self.waits[kind] = (sent if type(sent) is float else perf_counter()) - started
                else:
                    self.waits[kind] = 0.0
                return frame
            if not started:
                started = perf_counter()
                if self.will_spin(kind):
                    chunk = self._spin_read(need - len(buf), started + self.spin)
                    if chunk is not None:
                        if not chunk:
                            return None
                        buf += chunk
                        continue
            if self._polling:
                os.set_blocking(self.rfd, True)
                self._polling = False
            chunk = os.read(self.rfd, max(1 << 16, need - len(buf)))
            if not chunk:
                return None
            buf += chunk

    def _spin_read(self, need: int, deadline: float) -> bytes | None:
        """Poll the pipe (non-blocking reads) until ``deadline``; ``None`` if nothing came.

        Each empty poll yields the CPU: the scheduler often puts the host on the same
        CPU as its worker, and a poll that did not yield would keep the host, which
        is to write the frame, from running at all.
        """
        rfd = self.rfd
        if not self._polling:
            os.set_blocking(rfd, False)
            self._polling = True
        size = max(1 << 16, need)
        while True:
            try:
                return os.read(rfd, size)
            except BlockingIOError:
                if perf_counter() >= deadline:
                    return None
                os.sched_yield()

    def start(self, nonce: str) -> None:
        self.nonce = nonce
        self.log_bytes = 0

    def send(self, message: dict[str, Any]) -> None:
        data = frames.encode(message)
        with self._lock:
            frames.write_all(self.wfd, data)

    def finish(self, done: dict[str, Any]) -> None:
        """Send the execution's ``done`` frame and end it: from then on a ctx of that
        execution reaches the host no more (``call`` and ``log`` check ``nonce``
        under the same lock, so no frame of it can follow ``done``)."""
        try:
            data = frames.encode(done)
        except (TypeError, ValueError):  # a bug of ours: say so, rather than die
            keep = ("t", "n", "cpu", "sp", "ts")
            failed = {k: done[k] for k in keep if k in done}
            failed.update(ok=False, kind="internal", msg="the worker could not encode its result")
            data = frames.encode(failed)
        with self._lock:
            self.nonce = ""
            frames.write_all(self.wfd, data)

    def call(self, nonce: str, op: str, *args: Any) -> Any:
        """One host call of the execution ``nonce``; refused in the worker once that
        execution has ended, and for arguments no frame can carry."""
        call = {"t": "call", "n": nonce, "id": 0, "op": op, "a": args, "sp": False, "ts": 0.0}
        with self._lock:
            if nonce != self.nonce:
                raise error_class(ENDED)(ENDED_MESSAGE)
            self._seq += 1
            seq = call["id"] = self._seq
            call["sp"] = self.will_spin(REPLY)
            call["ts"] = perf_counter()
            try:
                data = frames.encode(call)
                bad_key = _non_string_key(args)  # walked once encoding found no cycle
                if bad_key is not None:
                    raise TypeError(bad_key)
            except UnicodeEncodeError:
                raise error_class("invalid_input")(
                    f"ctx.{op.replace('_', '.', 1)}: a string holds half a surrogate pair, "
                    "which is not valid Unicode"
                ) from None
            except (TypeError, ValueError, RecursionError) as exc:
                raise error_class("invalid_input")(
                    f"ctx.{op.replace('_', '.', 1)}: the arguments must be JSON "
                    f"({safe_text(str(exc))})"
                ) from None
            # The host takes a bigger frame for a broken worker: it is not sent.
            oversized = len(data) - frames.HEADER.size > frames.MAX_FRAME_BYTES
            if not oversized:
                frames.write_all(self.wfd, data)
                reply = self.read_frame(REPLY)
        if oversized:
            del data
            raise oversized_call(op, args)
        if reply is None or reply.get("id") != seq:
            raise SystemExit("host channel closed")
        self.set_spin(reply)
        if reply.get("t") == "err":
            raise error_class(str(reply.get("code")))(str(reply.get("msg")))
        return reply.get("v")

    def log(self, line: str, nonce: str | None = None) -> None:
        """One log line of the running execution (of ``nonce``, when given: a
        ``ctx.log`` of an execution that has ended raises). Half a surrogate pair
        becomes U+FFFD: a log line is for reading, not data."""
        current = self.nonce
        if not current or (nonce is not None and nonce != current):
            raise error_class(ENDED)(ENDED_MESSAGE)
        try:
            raw = line.encode("utf-8")
        except UnicodeEncodeError:
            line = safe_text(line)
            raw = line.encode("utf-8")
        # A line costs its bytes and its newline: empty lines are not free.
        size = len(raw) + 1
        room = MAX_LOG_BYTES - self.log_bytes
        if size > room:
            cut = raw[: max(room - 1, 0)].decode("utf-8", "ignore")
            if cut:
                self._send_log(current, cut)
            self.log_bytes = MAX_LOG_BYTES
            raise OutputLimit(f"logs are over {MAX_LOG_BYTES} bytes")
        self.log_bytes += size
        self._send_log(current, line)

    def _send_log(self, nonce: str, line: str) -> None:
        data = frames.encode({"t": "log", "n": nonce, "line": line})
        with self._lock:
            if nonce != self.nonce:  # ended while the line was on its way
                raise error_class(ENDED)(ENDED_MESSAGE)
            frames.write_all(self.wfd, data)


class LogWriter(io.TextIOBase):
    """``sys.stdout``/``sys.stderr`` of a script: every line becomes a log line.

    Lines belong to the execution that runs: a thread an earlier execution left
    behind (alive when this one began) prints into nothing, as its ``ctx.log``
    raises ``execution_ended``. Threads the running execution starts are its own.
    """

    def __init__(self, channel: Channel) -> None:
        super().__init__()
        self._channel = channel
        self._pending = ""
        self._stale: frozenset[int] = frozenset()

    def begin(self) -> None:
        """A new execution starts: every other thread alive now is an earlier one's."""
        self._pending = ""
        if _thread._count():  # type: ignore[attr-defined]
            self._stale = frozenset(sys._current_frames()) - {_thread.get_ident()}
        elif self._stale:
            self._stale = frozenset()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:  # type: ignore[override]
        if not isinstance(text, str):
            raise TypeError("write() argument must be str")
        if self._stale and _thread.get_ident() in self._stale:
            return len(text)  # an ended execution's thread: not this execution's log
        if len(self._pending) + len(text) > MAX_LOG_BYTES - self._channel.log_bytes:
            pending, self._pending = self._pending + text[: MAX_LOG_BYTES + 1], ""
            self._channel.log(pending)  # raises OutputLimit
        self._pending += text
        if "\n" in self._pending:
            *lines, self._pending = self._pending.split("\n")
            for line in lines:
                self._channel.log(line)
        return len(text)

    def flush(self) -> None:
        if self._pending:
            pending, self._pending = self._pending, ""
            self._channel.log(pending)


class Response:
    """What ``ctx.response(...)`` builds; return it from ``handle``."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def __repr__(self) -> str:
        return f"Response(status={self.status}, {len(self.body)} bytes)"

    def to_wire(self) -> dict[str, Any]:
        if len(self.body) > MAX_RESPONSE_BYTES:
            raise ResponseTooLarge(f"response body is over {MAX_RESPONSE_BYTES} bytes")
        try:
            body, enc = self.body.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            body = binascii.b2a_base64(self.body, newline=False).decode("ascii")
            enc = "base64"
        return {
            "status": self.status,
            "headers": [list(h) for h in self.headers],
            "body": body,
            "body_encoding": enc,
        }


def build_response(body: Any = None, status: int = 200, headers: Any = None) -> Response:
    problem = status_problem(status)
    if problem is not None:
        raise ValueError(problem)
    pairs: list[tuple[str, str]] = []
    items = headers.items() if isinstance(headers, dict) else (headers or ())
    for pair in items:
        name, value = pair
        if not isinstance(name, str) or not isinstance(value, str):
            raise ValueError("headers must map str to str")
        problem = header_problem(name, value)
        if problem is not None:
            raise ValueError(problem)
        pairs.append((name, value))
    if body is None:
        raw, ctype = b"", None
    elif isinstance(body, str):
        raw, ctype = body.encode("utf-8"), "text/plain; charset=utf-8"
    elif isinstance(body, (bytes, bytearray, memoryview)):
        raw, ctype = bytes(body), "application/octet-stream"
    else:
        raw, ctype = frames.dumps(body).encode("utf-8"), "application/json"
    if ctype and not any(n.lower() == "content-type" for n, _ in pairs):
        pairs.insert(0, ("content-type", ctype))
    problem = headers_problem(pairs)
    if problem is not None:
        raise ValueError(problem)
    return Response(status, pairs, raw)


def checked_response(value: Response) -> Response:
    """A returned :class:`Response` checked again, as a copy of plain values (a script
    may change one after ``ctx.response`` built it): what HTTP cannot carry is an
    :class:`InvalidReturn`."""
    status, headers, body = value.status, value.headers, value.body
    problem = status_problem(status)
    if problem is not None or type(status) is not int:
        raise InvalidReturn(f"the response's {problem or 'status must be an int'}")
    if type(body) is not bytes:
        raise InvalidReturn("the response's body must be bytes")
    if not isinstance(headers, (list, tuple)):
        raise InvalidReturn("the response's headers must be a list of (name, value)")
    pairs: list[tuple[str, str]] = []
    for pair in headers:
        if not (
            isinstance(pair, (list, tuple))
            and len(pair) == 2
            and type(pair[0]) is str
            and type(pair[1]) is str
        ):
            raise InvalidReturn("the response's headers must be (name, value) string pairs")
        name, text = pair
        problem = header_problem(name, text)
        if problem is not None:
            raise InvalidReturn(problem)
        pairs.append((name, text))
    problem = headers_problem(pairs)
    if problem is not None:
        raise InvalidReturn(problem)
    return Response(status, pairs, body)


def response_from_return(value: Any) -> Response:
    """API.md's return-value mapping."""
    if isinstance(value, Response):
        return checked_response(value)
    if value is None:
        return Response(204, [], b"")
    if isinstance(value, str):
        try:
            raw = str.encode(value)
        except UnicodeEncodeError:
            raise InvalidReturn(
                "the returned str holds half a surrogate pair, which is not valid Unicode"
            ) from None
        return Response(200, [("content-type", "text/plain; charset=utf-8")], raw)
    if isinstance(value, (bool, int, float, dict, list)):
        try:
            raw = frames.dumps(value).encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidReturn(
                "the return value holds half a surrogate pair, which is not valid Unicode"
            ) from None
        except (TypeError, ValueError, RecursionError) as exc:
            raise InvalidReturn(f"the return value is not JSON: {exc}") from None
        return Response(200, [("content-type", "application/json")], raw)
    raise InvalidReturn(
        f"handle returned {type(value).__name__}; return ctx.response(...), "
        "a dict, list, number, bool, str or None"
    )


class KV:
    """``ctx.kv``: the app's key-value store, for one execution (``_n``)."""

    __slots__ = ("_ch", "_n")

    def __init__(self, channel: Channel, nonce: str) -> None:
        self._ch = channel
        self._n = nonce

    def get(self, key: str) -> Any:
        return self._ch.call(self._n, "kv_get", key)

    def set(self, key: str, value: Any) -> None:
        self._ch.call(self._n, "kv_set", key, value)

    def delete(self, key: str) -> bool:
        return bool(self._ch.call(self._n, "kv_delete", key))

    def list(
        self, prefix: str = "", limit: int = 100, after: str | None = None
    ) -> list[dict[str, Any]]:
        """Up to ``limit`` entries whose key starts with ``prefix``, in key order;
        with ``after``, only keys sorting after it (the next page: the last key of
        this one)."""
        return self._ch.call(self._n, "kv_list", prefix, limit, after)  # type: ignore[no-any-return]


class Docs:
    """``ctx.docs``: the app's document store, for one execution (``_n``)."""

    __slots__ = ("_ch", "_n")

    def __init__(self, channel: Channel, nonce: str) -> None:
        self._ch = channel
        self._n = nonce

    def insert(self, collection: str, data: dict[str, Any], id: str | None = None) -> str:
        return self._ch.call(self._n, "docs_insert", collection, data, id)  # type: ignore[no-any-return]

    def get(self, collection: str, id: str) -> dict[str, Any] | None:
        return self._ch.call(self._n, "docs_get", collection, id)  # type: ignore[no-any-return]

    def update(self, collection: str, id: str, data: dict[str, Any]) -> None:
        self._ch.call(self._n, "docs_update", collection, id, data)

    def delete(self, collection: str, id: str) -> bool:
        return bool(self._ch.call(self._n, "docs_delete", collection, id))

    def query(
        self,
        collection: str,
        where: dict[str, Any] | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[dict[str, Any]]:
        """Up to ``limit`` matching documents, in id order; with ``after``, only ids
        sorting after it (the next page: the last id of this one)."""
        return self._ch.call(self._n, "docs_query", collection, where, limit, after)  # type: ignore[no-any-return]


class Context:
    """``ctx``: who and what this execution is, and the host API.

    A ``ctx`` belongs to the execution it was made for (the channel's ``nonce`` at
    the time): once that execution has ended, its host calls and ``log`` raise
    ``ExecutionEnded`` (code ``execution_ended``) in the calling thread, and nothing
    reaches the host. A thread the script left behind therefore never writes into a
    later execution's transaction, nor breaks its frames.
    """

    Rejected = Rejected
    Error = HostError

    def __init__(self, channel: Channel, fields: dict[str, Any]) -> None:
        nonce = channel.nonce
        self._ch = channel
        self._n = nonce
        self.app: str = fields["app"]
        self.execution_id: str = fields["execution_id"]
        self.attempt: int = fields["attempt"]
        self.trigger_depth: int = fields["trigger_depth"]
        self.principal: str = fields["principal"]
        self.kv = KV(channel, nonce)
        self.docs = Docs(channel, nonce)

    def log(self, *args: Any) -> None:
        self._ch.log(" ".join(str(a) for a in args), self._n)

    def reject(self, message: str = "rejected") -> None:
        raise Rejected(str(message))

    def response(self, body: Any = None, status: int = 200, headers: Any = None) -> Response:
        return build_response(body, status, headers)


def _non_string_key(value: Any) -> str | None:
    """Why ``value`` holds a dict key that is not a string, or ``None``. JSON would
    turn ``1``, ``True`` or ``None`` into a string key (``{1: 2, "1": 3}`` into
    ``{"1": 3}``): a host call refuses it instead of storing something else."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key in item:
                if not isinstance(key, str):
                    return f"a dict key must be a string, not {type(key).__name__} {key!r:.40}"
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return None
