"""One execution: what the executor is asked to run and what comes back."""

from __future__ import annotations

import base64
import uuid
from typing import Any

import attrs

from picloud_shared import wire
from picloud_shared.ids import AppId, ExecutionId, ScriptId, UserId
from picloud_shared.principals import Capability, Principal
from picloud_shared.responses import header_problem, headers_problem
from picloud_shared.status import ExecErrorKind, InboxFailureKind, failure_kind_for
from picloud_shared.wire import Json, JsonObject, WireError


@attrs.frozen
class ScriptResponse:
    """An HTTP-shaped answer built from a script's return value.

    ``body`` is raw bytes; the wire form carries it as UTF-8 text when it decodes,
    otherwise base64.
    """

    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""

    @classmethod
    def json(cls, value: Json, status: int = 200) -> ScriptResponse:
        body = wire.dumps(value).encode()
        return cls(status, (("content-type", "application/json"),), body)

    @classmethod
    def text(cls, value: str, status: int = 200) -> ScriptResponse:
        return cls(status, (("content-type", "text/plain; charset=utf-8"),), value.encode())

    @classmethod
    def empty(cls) -> ScriptResponse:
        return cls(204, (), b"")

    def to_wire(self) -> JsonObject:
        body, encoding = _body_text(self.body)
        return {
            "status": self.status,
            "headers": [[k, v] for k, v in self.headers],
            "body": body,
            "body_encoding": encoding,
        }

    @classmethod
    def from_wire(cls, data: object) -> ScriptResponse:
        d = wire.obj(data, "response")
        status = wire.field(d, "status", int)
        headers_raw = wire.field(d, "headers", list)
        headers: list[tuple[str, str]] = []
        for pair in headers_raw:
            if not (
                isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)
            ):
                raise WireError("headers must be [name, value] string pairs")
            problem = header_problem(pair[0], pair[1])
            if problem is not None:
                raise WireError(problem)
            headers.append((pair[0], pair[1]))
        problem = headers_problem(headers)
        if problem is not None:
            raise WireError(problem)
        body = wire.field(d, "body", str)
        encoding = d.get("body_encoding", "utf-8")
        if encoding == "utf-8":
            raw = body.encode("utf-8")
        elif encoding == "base64":
            try:
                raw = base64.b64decode(body, validate=True)
            except ValueError as exc:
                raise WireError("bad base64 body") from exc
        else:
            raise WireError(f"unknown body_encoding {encoding!r}")
        return cls(status, tuple(headers), raw)


def _body_text(raw: bytes) -> tuple[str, str]:
    """(text, encoding) of a body: UTF-8 text when a ``jsonb`` string can hold it,
    base64 otherwise (a NUL byte is valid UTF-8, but no ``jsonb`` string holds one)."""
    if b"\x00" not in raw:
        try:
            return raw.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            pass
    return base64.b64encode(raw).decode("ascii"), "base64"


def _optional_text(value: str | None) -> str | None:
    return None if value is None else wire.storable_text(value)


def _log_lines(lines: tuple[str, ...]) -> tuple[str, ...]:
    if not lines or not any("\x00" in line for line in lines):
        return tuple(lines)
    return tuple(wire.storable_text(line) for line in lines)


@attrs.frozen
class ExecError:
    """Why an execution failed. ``traceback`` is the script's own, never the host's.

    Text from a script (its exception's message, its traceback) is kept storable:
    a NUL becomes U+FFFD (``wire.storable_text``)."""

    kind: ExecErrorKind
    message: str = attrs.field(converter=wire.storable_text)
    traceback: str | None = attrs.field(default=None, converter=_optional_text)

    @property
    def failure_kind(self) -> InboxFailureKind:
        return failure_kind_for(self.kind)

    def to_wire(self) -> JsonObject:
        return {"kind": self.kind.value, "message": self.message, "traceback": self.traceback}

    @classmethod
    def from_wire(cls, data: object) -> ExecError:
        d = wire.obj(data, "error")
        tb = d.get("traceback")
        if tb is not None and not isinstance(tb, str):
            raise WireError("traceback must be a string")
        return cls(wire.enum_value(ExecErrorKind, d.get("kind")), wire.field(d, "message", str), tb)


@attrs.frozen
class ExecRequest:
    """Everything a worker needs to run one script once.

    ``event`` is the script-facing event (API.md, "Scripts"); ``attempt`` is 1-based.
    """

    execution_id: ExecutionId
    app_id: AppId
    app_name: str
    script_id: ScriptId
    script_version: int
    source: str
    event: JsonObject
    principal: Principal
    timeout_seconds: float = 10
    memory_limit_mb: int = 128
    attempt: int = 1
    trigger_depth: int = 0

    def context_wire(self) -> JsonObject:
        """The plain fields of ``ctx`` a script can read."""
        return {
            "app": self.app_name,
            "execution_id": str(self.execution_id),
            "attempt": self.attempt,
            "trigger_depth": self.trigger_depth,
            "principal": str(self.principal.user_id),
        }

    def to_wire(self) -> JsonObject:
        return {
            "execution_id": str(self.execution_id),
            "app_id": str(self.app_id),
            "app_name": self.app_name,
            "script_id": str(self.script_id),
            "script_version": self.script_version,
            "source": self.source,
            "event": self.event,
            "principal": {
                "user_id": str(self.principal.user_id),
                "app_id": str(self.principal.app_id),
                "capabilities": sorted(c.value for c in self.principal.capabilities),
                "is_instance_admin": self.principal.is_instance_admin,
            },
            "timeout_seconds": self.timeout_seconds,
            "memory_limit_mb": self.memory_limit_mb,
            "attempt": self.attempt,
            "trigger_depth": self.trigger_depth,
        }

    @classmethod
    def from_wire(cls, data: object) -> ExecRequest:
        d = wire.obj(data, "request")
        p = wire.obj(d.get("principal"), "principal")
        try:
            principal = Principal(
                user_id=UserId(uuid.UUID(wire.field(p, "user_id", str))),
                app_id=AppId(uuid.UUID(wire.field(p, "app_id", str))),
                capabilities=Capability.parse_all(wire.field(p, "capabilities", list)),
                is_instance_admin=wire.field(p, "is_instance_admin", bool),
            )
            return cls(
                execution_id=ExecutionId(uuid.UUID(wire.field(d, "execution_id", str))),
                app_id=AppId(uuid.UUID(wire.field(d, "app_id", str))),
                app_name=wire.field(d, "app_name", str),
                script_id=ScriptId(uuid.UUID(wire.field(d, "script_id", str))),
                script_version=wire.field(d, "script_version", int),
                source=wire.field(d, "source", str),
                event=dict(wire.obj(d.get("event"), "event")),
                principal=principal,
                timeout_seconds=wire.field(d, "timeout_seconds", (int, float)),
                memory_limit_mb=wire.field(d, "memory_limit_mb", int),
                attempt=wire.field(d, "attempt", int),
                trigger_depth=wire.field(d, "trigger_depth", int),
            )
        except (ValueError, TypeError) as exc:
            if isinstance(exc, WireError):
                raise
            raise WireError(str(exc)) from exc


def _one_of(instance: Any, attribute: Any, value: Any) -> None:
    if (instance.response is None) == (instance.error is None):
        raise ValueError("an ExecResult has exactly one of response and error")


@attrs.frozen
class ExecResult:
    """The outcome of one execution: a response or an error, plus captured logs (a NUL
    in a log line becomes U+FFFD, as in :class:`ExecError`)."""

    execution_id: ExecutionId
    response: ScriptResponse | None = None
    error: ExecError | None = attrs.field(default=None, validator=_one_of)
    logs: tuple[str, ...] = attrs.field(default=(), converter=_log_lines)
    duration_ms: float = 0.0

    @classmethod
    def succeeded(
        cls,
        execution_id: ExecutionId,
        response: ScriptResponse,
        logs: tuple[str, ...] = (),
        duration_ms: float = 0.0,
    ) -> ExecResult:
        return cls(execution_id, response, None, logs, duration_ms)

    @classmethod
    def failed(
        cls,
        execution_id: ExecutionId,
        error: ExecError,
        logs: tuple[str, ...] = (),
        duration_ms: float = 0.0,
    ) -> ExecResult:
        return cls(execution_id, None, error, logs, duration_ms)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_wire(self) -> JsonObject:
        return {
            "execution_id": str(self.execution_id),
            "response": None if self.response is None else self.response.to_wire(),
            "error": None if self.error is None else self.error.to_wire(),
            "logs": list(self.logs),
            "duration_ms": self.duration_ms,
        }

    @classmethod
    def from_wire(cls, data: object) -> ExecResult:
        d = wire.obj(data, "result")
        logs = wire.field(d, "logs", list)
        if not all(isinstance(line, str) for line in logs):
            raise WireError("logs must be strings")
        resp = d.get("response")
        err = d.get("error")
        try:
            return cls(
                ExecutionId(uuid.UUID(wire.field(d, "execution_id", str))),
                None if resp is None else ScriptResponse.from_wire(resp),
                None if err is None else ExecError.from_wire(err),
                tuple(logs),
                float(wire.field(d, "duration_ms", (int, float))),
            )
        except ValueError as exc:
            if isinstance(exc, WireError):
                raise
            raise WireError(str(exc)) from exc
