"""Answers to a waiting sync HTTP caller."""

from __future__ import annotations

import enum
import uuid

import attrs

from picloud_shared import wire
from picloud_shared.execution import ExecResult, ScriptResponse
from picloud_shared.ids import ExecutionId
from picloud_shared.status import ExecErrorKind, InboxFailureKind, http_status_for
from picloud_shared.wire import JsonObject, WireError

# What a route's caller (anyone on the network) learns of a script's own failure: which
# way it failed, not the text of its exception, which may quote the app's data. The
# execution record has the message and traceback for the app's members who may read
# data. A rejection's message is the script's answer to its caller and goes out as is.
CALLER_MESSAGES = {
    ExecErrorKind.SYNTAX_ERROR: "the script does not compile",
    ExecErrorKind.MISSING_HANDLER: "the script has no callable handle(event, ctx)",
    ExecErrorKind.UNCAUGHT_EXCEPTION: "the script raised an exception",
    ExecErrorKind.INVALID_RETURN: "the script returned a value a route cannot answer with",
}


class DeliveryStatus(enum.StrEnum):
    """Whether an answer reached its waiting receiver."""

    DELIVERED = "delivered"
    ABANDONED = "abandoned"  # unknown inbox id, receiver gone, or wait expired


@attrs.frozen
class InboxResult:
    """What a sync HTTP caller gets: the script's response, or a failure of the table."""

    execution_id: ExecutionId
    response: ScriptResponse | None = None
    failure: InboxFailureKind | None = None
    message: str = ""

    def __attrs_post_init__(self) -> None:
        if (self.response is None) == (self.failure is None):
            raise ValueError("an InboxResult has exactly one of response and failure")

    @classmethod
    def from_exec_result(cls, result: ExecResult) -> InboxResult:
        if result.error is None:
            assert result.response is not None
            return cls(result.execution_id, response=result.response)
        error = result.error
        message = CALLER_MESSAGES.get(error.kind)
        if message is not None:
            message += "; its execution record has the details"
        return cls(
            result.execution_id, failure=error.failure_kind, message=message or error.message
        )

    @classmethod
    def failed(cls, execution_id: ExecutionId, kind: InboxFailureKind, message: str) -> InboxResult:
        return cls(execution_id, failure=kind, message=message)

    @property
    def http_status(self) -> int:
        if self.response is not None:
            return self.response.status
        assert self.failure is not None
        return http_status_for(self.failure)

    def error_body(self) -> JsonObject:
        """The API's failure body ``{"error": {"code", "message", "execution_id"}}``."""
        assert self.failure is not None
        return {
            "error": {
                "code": self.failure.value,
                "message": self.message,
                "execution_id": str(self.execution_id),
            }
        }

    def to_wire(self) -> JsonObject:
        return {
            "execution_id": str(self.execution_id),
            "response": None if self.response is None else self.response.to_wire(),
            "failure": None if self.failure is None else self.failure.value,
            "message": self.message,
        }

    @classmethod
    def from_wire(cls, data: object) -> InboxResult:
        d = wire.obj(data, "inbox result")
        try:
            exec_id = ExecutionId(uuid.UUID(wire.field(d, "execution_id", str)))
        except ValueError as exc:
            raise WireError("bad execution_id") from exc
        resp, failure = d.get("response"), d.get("failure")
        try:
            return cls(
                exec_id,
                None if resp is None else ScriptResponse.from_wire(resp),
                None if failure is None else wire.enum_value(InboxFailureKind, failure),
                wire.field(d, "message", str),
            )
        except ValueError as exc:
            if isinstance(exc, WireError):
                raise
            raise WireError(str(exc)) from exc
