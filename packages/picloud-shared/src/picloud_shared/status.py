"""Failure kinds and the status-code table (DESIGN.md, "Failure kinds → HTTP").

Three layers, each a total function of the one before::

    ExecErrorKind  ──failure_kind_for──▶  InboxFailureKind  ──http_status_for──▶  int
"""

from __future__ import annotations

import enum
from types import MappingProxyType


class ExecErrorKind(enum.StrEnum):
    """Why one execution did not produce a result."""

    REJECTED = "rejected"  # the script called ctx.reject
    BAD_REQUEST = "bad_request"  # the request could not be decoded for the route
    SYNTAX_ERROR = "syntax_error"
    MISSING_HANDLER = "missing_handler"
    UNCAUGHT_EXCEPTION = "uncaught_exception"
    INVALID_RETURN = "invalid_return"
    OVERLOADED = "overloaded"
    TIMEOUT = "timeout"
    CPU_LIMIT = "cpu_limit"
    MEMORY_LIMIT = "memory_limit"
    FILE_SIZE_LIMIT = "file_size_limit"
    OUTPUT_LIMIT = "output_limit"
    WORKER_CRASH = "worker_crash"
    PROTOCOL_VIOLATION = "protocol_violation"
    PRINCIPAL_REVOKED = "principal_revoked"
    INTERNAL = "internal"


class InboxFailureKind(enum.StrEnum):
    """The failure classes a sync HTTP caller can see."""

    REJECTED = "rejected"
    SCRIPT_ERROR = "script_error"
    OVERLOADED = "overloaded"
    TIMEOUT = "timeout"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    INTERNAL = "internal"


class ExecutionStatus(enum.StrEnum):
    """Lifecycle of an ``executions`` row."""

    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DEAD_LETTERED = "dead_lettered"
    SKIPPED = "skipped"

    @property
    def is_final(self) -> bool:
        return self in _FINAL


_FINAL = frozenset(
    {
        ExecutionStatus.SUCCEEDED,
        ExecutionStatus.FAILED,
        ExecutionStatus.DEAD_LETTERED,
        ExecutionStatus.SKIPPED,
    }
)

FAILURE_KIND_BY_ERROR: MappingProxyType[ExecErrorKind, InboxFailureKind] = MappingProxyType(
    {
        ExecErrorKind.REJECTED: InboxFailureKind.REJECTED,
        ExecErrorKind.BAD_REQUEST: InboxFailureKind.REJECTED,
        ExecErrorKind.SYNTAX_ERROR: InboxFailureKind.SCRIPT_ERROR,
        ExecErrorKind.MISSING_HANDLER: InboxFailureKind.SCRIPT_ERROR,
        ExecErrorKind.UNCAUGHT_EXCEPTION: InboxFailureKind.SCRIPT_ERROR,
        ExecErrorKind.INVALID_RETURN: InboxFailureKind.SCRIPT_ERROR,
        ExecErrorKind.OVERLOADED: InboxFailureKind.OVERLOADED,
        ExecErrorKind.TIMEOUT: InboxFailureKind.TIMEOUT,
        ExecErrorKind.CPU_LIMIT: InboxFailureKind.TIMEOUT,
        ExecErrorKind.MEMORY_LIMIT: InboxFailureKind.RESOURCE_EXHAUSTED,
        ExecErrorKind.FILE_SIZE_LIMIT: InboxFailureKind.RESOURCE_EXHAUSTED,
        ExecErrorKind.OUTPUT_LIMIT: InboxFailureKind.RESOURCE_EXHAUSTED,
        ExecErrorKind.WORKER_CRASH: InboxFailureKind.INTERNAL,
        ExecErrorKind.PROTOCOL_VIOLATION: InboxFailureKind.INTERNAL,
        ExecErrorKind.PRINCIPAL_REVOKED: InboxFailureKind.INTERNAL,
        ExecErrorKind.INTERNAL: InboxFailureKind.INTERNAL,
    }
)

HTTP_STATUS_BY_FAILURE: MappingProxyType[InboxFailureKind, int] = MappingProxyType(
    {
        InboxFailureKind.REJECTED: 422,
        InboxFailureKind.SCRIPT_ERROR: 502,
        InboxFailureKind.OVERLOADED: 503,
        InboxFailureKind.TIMEOUT: 504,
        InboxFailureKind.RESOURCE_EXHAUSTED: 507,
        InboxFailureKind.INTERNAL: 500,
    }
)

# Errors after which a trigger execution is not retried (retrying cannot help).
NON_RETRYABLE: frozenset[ExecErrorKind] = frozenset(
    {ExecErrorKind.REJECTED, ExecErrorKind.BAD_REQUEST, ExecErrorKind.PRINCIPAL_REVOKED}
)


def failure_kind_for(kind: ExecErrorKind) -> InboxFailureKind:
    """The failure class a caller sees for an execution error."""
    return FAILURE_KIND_BY_ERROR[kind]


def http_status_for(kind: InboxFailureKind) -> int:
    """The HTTP status of the failure table."""
    return HTTP_STATUS_BY_FAILURE[kind]
