"""The public error tree.

Every error a user can see is a :class:`PicloudError` with a stable ``code`` (part of
the API contract, snake_case) and the HTTP status it maps to. The class docstring is
the default message::

    PicloudError                      500 internal
    ├── InvalidInput                  422 invalid_input
    │   ├── InvalidName               422 invalid_name
    │   ├── InvalidGlob               422 invalid_glob
    │   ├── UnknownOp                 422 unknown_op
    │   ├── UnknownScript             422 unknown_script
    │   ├── InvalidRetryPolicy        422 invalid_retry_policy
    │   └── LimitExceeded             422 limit_exceeded
    ├── PayloadTooLarge               413 payload_too_large
    ├── StorageQuotaExceeded          507 storage_quota_exceeded
    ├── Unauthenticated               401 unauthenticated
    ├── Forbidden                     403 forbidden
    ├── NotFound                      404 not_found
    ├── MethodNotAllowed              405 method_not_allowed
    ├── Conflict                      409 conflict
    └── PrincipalRevoked              403 principal_revoked
"""

from __future__ import annotations

from typing import ClassVar


class PicloudError(Exception):
    """Internal error."""

    code: ClassVar[str] = "internal"
    http_status: ClassVar[int] = 500

    def __init__(self, message: str | None = None) -> None:
        self.message = message if message is not None else (self.__doc__ or self.code).strip()
        super().__init__(self.message)

    def to_wire(self) -> dict[str, str]:
        """The ``error`` object of the API's error body."""
        return {"code": self.code, "message": self.message}


class InvalidInput(PicloudError):
    """The request is not valid."""

    code = "invalid_input"
    http_status = 422


class InvalidName(InvalidInput):
    """The name does not match the allowed pattern."""

    code = "invalid_name"


class InvalidGlob(InvalidInput):
    """A glob must be 1 to 256 characters."""

    code = "invalid_glob"


class UnknownOp(InvalidInput):
    """Unknown operation."""

    code = "unknown_op"


class UnknownScript(InvalidInput):
    """No script of that name exists in this app."""

    code = "unknown_script"


class InvalidRetryPolicy(InvalidInput):
    """The retry policy is not valid."""

    code = "invalid_retry_policy"


class LimitExceeded(InvalidInput):
    """A value is outside its documented limit."""

    code = "limit_exceeded"


class PayloadTooLarge(PicloudError):
    """The payload is larger than its documented limit."""

    code = "payload_too_large"
    http_status = 413


class RequestTimeout(PicloudError):
    """The request body did not arrive in time."""

    code = "request_timeout"
    http_status = 408


class StorageQuotaExceeded(PicloudError):
    """The app's storage quota is used up; delete data to make room."""

    code = "storage_quota_exceeded"
    http_status = 507


class Unauthenticated(PicloudError):
    """A valid bearer token is required."""

    code = "unauthenticated"
    http_status = 401


class Forbidden(PicloudError):
    """The caller lacks the capability this action needs."""

    code = "forbidden"
    http_status = 403


class NotFound(PicloudError):
    """Not found."""

    code = "not_found"
    http_status = 404


class MethodNotAllowed(PicloudError):
    """The path exists but not for this method."""

    code = "method_not_allowed"
    http_status = 405


class Conflict(PicloudError):
    """The resource already exists or is still in use."""

    code = "conflict"
    http_status = 409


class PrincipalRevoked(PicloudError):
    """The principal that registered this trigger or route no longer holds the capability."""

    code = "principal_revoked"
    http_status = 403


class Busy(PicloudError):
    """The database kept aborting the operation for conflicts with concurrent work
    (deadlocks, serialization failures); nothing was changed. Try again."""

    code = "busy"
    http_status = 503


class Unavailable(PicloudError):
    """The database could not be reached (it is restarting, or the connection broke).
    Nothing was changed. Try again."""

    code = "unavailable"
    http_status = 503


ALL_ERRORS: tuple[type[PicloudError], ...] = (
    PicloudError,
    InvalidInput,
    InvalidName,
    InvalidGlob,
    UnknownOp,
    UnknownScript,
    InvalidRetryPolicy,
    LimitExceeded,
    PayloadTooLarge,
    StorageQuotaExceeded,
    Unauthenticated,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    Conflict,
    PrincipalRevoked,
    Busy,
    Unavailable,
)
