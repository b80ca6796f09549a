"""The ``ctx`` object a script sees, inside the worker (API.md, "Scripts").

Every ``ctx.kv``/``ctx.docs`` call is one ``call`` frame to the host and one
``ret``/``err`` frame back; a host error is re-raised here as the matching
:class:`picloud_shared.errors.PicloudError` subclass (``.code``, ``.message``), so
a script can catch it. Logs (``ctx.log`` and ``print``) travel as one-way ``log``
frames, capped per execution.

Standard library (plus the two tiny ``picloud_shared`` modules) only: the worker
bootstrap imports this module.
"""

from __future__ import annotations

import _thread
import binascii
import io
import os
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


REPLY, NEXT_EXEC = 0, 1  # the two kinds of wait


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
                body = bytes(buf[4:need])
                del buf[:need]
                frame = frames.decode(body)
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

    def call(self, op: str, *args: Any) -> Any:
        with self._lock:
            self._seq += 1
            seq = self._seq
            call = {"t": "call", "n": self.nonce, "id": seq, "op": op, "a": args}
            call["sp"] = self.will_spin(REPLY)
            call["ts"] = perf_counter()
            frames.write_all(self.wfd, frames.encode(call))
            reply = self.read_frame(REPLY)
        if reply is None or reply.get("id") != seq:
            raise SystemExit("host channel closed")
        self.set_spin(reply)
        if reply.get("t") == "err":
            raise error_class(str(reply.get("code")))(str(reply.get("msg")))
        return reply.get("v")

    def log(self, line: str) -> None:
        # A line costs its bytes and its newline: empty lines are not free.
        size = len(line.encode("utf-8", "replace")) + 1
        room = MAX_LOG_BYTES - self.log_bytes
        if size > room:
            cut = line.encode("utf-8", "replace")[: max(room - 1, 0)].decode("utf-8", "ignore")
            if cut:
                self.send({"t": "log", "n": self.nonce, "line": cut})
            self.log_bytes = MAX_LOG_BYTES
            raise OutputLimit(f"logs are over {MAX_LOG_BYTES} bytes")
        self.log_bytes += size
        self.send({"t": "log", "n": self.nonce, "line": line})


class LogWriter(io.TextIOBase):
    """``sys.stdout``/``sys.stderr`` of a script: every line becomes a log line."""

    def __init__(self, channel: Channel) -> None:
        super().__init__()
        self._channel = channel
        self._pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:  # type: ignore[override]
        if not isinstance(text, str):
            raise TypeError("write() argument must be str")
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


def response_from_return(value: Any) -> Response:
    """API.md's return-value mapping."""
    if isinstance(value, Response):
        return value
    if value is None:
        return Response(204, [], b"")
    if isinstance(value, str):
        return Response(200, [("content-type", "text/plain; charset=utf-8")], value.encode())
    if isinstance(value, (bool, int, float, dict, list)):
        try:
            raw = frames.dumps(value).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise InvalidReturn(f"the return value is not JSON: {exc}") from None
        return Response(200, [("content-type", "application/json")], raw)
    raise InvalidReturn(
        f"handle returned {type(value).__name__}; return ctx.response(...), "
        "a dict, list, number, bool, str or None"
    )


class KV:
    """``ctx.kv``: the app's key-value store."""

    __slots__ = ("_ch",)

    def __init__(self, channel: Channel) -> None:
        self._ch = channel

    def get(self, key: str) -> Any:
        return self._ch.call("kv_get", key)

    def set(self, key: str, value: Any) -> None:
        self._ch.call("kv_set", key, value)

    def delete(self, key: str) -> bool:
        return bool(self._ch.call("kv_delete", key))

    def list(self, prefix: str = "", limit: int = 100) -> list[dict[str, Any]]:
        return self._ch.call("kv_list", prefix, limit)  # type: ignore[no-any-return]


class Docs:
    """``ctx.docs``: the app's document store."""

    __slots__ = ("_ch",)

    def __init__(self, channel: Channel) -> None:
        self._ch = channel

    def insert(self, collection: str, data: dict[str, Any], id: str | None = None) -> str:
        return self._ch.call("docs_insert", collection, data, id)  # type: ignore[no-any-return]

    def get(self, collection: str, id: str) -> dict[str, Any] | None:
        return self._ch.call("docs_get", collection, id)  # type: ignore[no-any-return]

    def update(self, collection: str, id: str, data: dict[str, Any]) -> None:
        self._ch.call("docs_update", collection, id, data)

    def delete(self, collection: str, id: str) -> bool:
        return bool(self._ch.call("docs_delete", collection, id))

    def query(
        self, collection: str, where: dict[str, Any] | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        return self._ch.call("docs_query", collection, where, limit)  # type: ignore[no-any-return]


class Context:
    """``ctx``: who and what this execution is, and the host API."""

    Rejected = Rejected
    Error = HostError

    def __init__(self, channel: Channel, fields: dict[str, Any]) -> None:
        self._ch = channel
        self.app: str = fields["app"]
        self.execution_id: str = fields["execution_id"]
        self.attempt: int = fields["attempt"]
        self.trigger_depth: int = fields["trigger_depth"]
        self.principal: str = fields["principal"]
        self.kv = KV(channel)
        self.docs = Docs(channel)

    def log(self, *args: Any) -> None:
        self._ch.log(" ".join(str(a) for a in args))

    def reject(self, message: str = "rejected") -> None:
        raise Rejected(str(message))

    def response(self, body: Any = None, status: int = 200, headers: Any = None) -> Response:
        return build_response(body, status, headers)
