"""Request and response plumbing: JSON bodies under the size cap, typed field
access, and the error body ``{"error": {"code", "message"}}``."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote_to_bytes

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from picloud_shared import wire
from picloud_shared.errors import (
    Busy,
    InvalidInput,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    PicloudError,
    RequestTimeout,
    Unauthenticated,
    Unavailable,
)
from picloud_shared.limits import BODY_READ_TIMEOUT_SECONDS, MAX_REQUEST_BODY_BYTES
from picloud_shared.wire import Json

_MISSING: Any = object()


def json_response(
    body: Json, status_code: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    """A JSON answer."""
    return JSONResponse(body, status_code=status_code, headers=headers)


def no_content() -> Response:
    """An empty 204 answer."""
    return Response(status_code=204)


def error_response(error: PicloudError, *, allow: list[str] | None = None) -> Response:
    """The API's error body for ``error``, with its status (and auth/allow headers)."""
    headers: dict[str, str] = {}
    if isinstance(error, Unauthenticated):
        headers["WWW-Authenticate"] = "Bearer"
    if isinstance(error, MethodNotAllowed) and allow:
        headers["Allow"] = ", ".join(allow)
    if isinstance(error, (Busy, Unavailable)):
        headers["Retry-After"] = "1"
    if isinstance(error, (PayloadTooLarge, RequestTimeout)):
        headers["Connection"] = "close"  # the rest of the body is not read
    return JSONResponse({"error": error.to_wire()}, error.http_status, headers=headers)


def internal_error_response() -> Response:
    """The 500 body: never anything about what went wrong inside."""
    return JSONResponse({"error": {"code": "internal", "message": "internal error"}}, 500)


async def read_json(
    request: Request,
    limit: int = MAX_REQUEST_BODY_BYTES,
    timeout: float | None = None,
) -> Json:
    """The request body parsed as JSON.

    Raises ``PayloadTooLarge`` past ``limit`` bytes (by ``Content-Length`` or as
    streamed), ``RequestTimeout`` when it is not whole within ``timeout`` seconds
    (default ``BODY_READ_TIMEOUT_SECONDS``), and ``InvalidInput`` for anything that
    is not one JSON value.
    """
    if timeout is None:
        timeout = BODY_READ_TIMEOUT_SECONDS
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise InvalidInput("malformed Content-Length") from None
        if size > limit:
            raise PayloadTooLarge(f"request bodies are limited to {limit} bytes")
    chunks: list[bytes] = []
    received = 0
    with anyio.move_on_after(timeout) as scope:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise PayloadTooLarge(f"request bodies are limited to {limit} bytes")
            chunks.append(chunk)
    if scope.cancelled_caught:
        raise RequestTimeout(f"the request body did not arrive within {timeout:g} s")
    try:
        return wire.loads_untrusted(b"".join(chunks))
    except wire.WireError as exc:
        raise InvalidInput(f"the request body is not valid JSON ({exc})") from None


# Each kind of id a path takes: its article, and where the admin API lists them
# (``{id}``: the app's id).
ADMIN_PREFIX = "/api/v1/admin"
_ID_KINDS: Mapping[str, tuple[str, str]] = {
    "app": ("an", "/apps"),
    "user": ("a", "/users"),
    "route": ("a", "/apps/{id}/routes"),
    "trigger": ("a", "/apps/{id}/triggers"),
    "execution": ("an", "/apps/{id}/executions"),
    "dead letter": ("a", "/apps/{id}/dead-letters"),
}
MAX_SHOWN_PATH_CHARS = 64


def path_uuid(request: Request, name: str, what: str) -> uuid.UUID:
    """A UUID path parameter; anything malformed is ``NotFound`` (it cannot exist).

    The message says the path takes the ``what``'s id, not its name (user routes take
    an app's name, so people try it here), and where those ids are listed. It depends
    on the text given alone, never on what exists.
    """
    try:
        raw = request.path_params[name]
    except KeyError:
        raise NotFound(f"no such {what}") from None
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise NotFound(_not_an_id(request, raw, what)) from None


def _not_an_id(request: Request, raw: str, what: str) -> str:
    shown = raw if len(raw) <= MAX_SHOWN_PATH_CHARS else raw[:MAX_SHOWN_PATH_CHARS] + "…"
    if what not in _ID_KINDS:
        return f"{shown!r} is not a {what} id: admin paths take the {what}'s id"
    article, listed = _ID_KINDS[what]
    try:  # the app's id in a path under /apps/{id}/ (checked before the id after it)
        app = "{id}" if what == "app" else str(uuid.UUID(request.path_params.get("id", "")))
    except ValueError:
        app = "{id}"
    return (
        f"{shown!r} is not {article} {what} id: admin paths take the {what}'s id"
        f" (GET {ADMIN_PREFIX}{listed.format(id=app)} lists {what}s with their ids)"
    )


class Fields:
    """Typed access to a JSON object body; wrong types name the field (422)."""

    def __init__(self, data: Mapping[str, Json]) -> None:
        self._data = data

    @classmethod
    def of(cls, body: Json) -> Fields:
        """Wrap a parsed body, which must be a JSON object."""
        if not isinstance(body, dict):
            raise InvalidInput("the request body must be a JSON object")
        return cls(body)

    def __contains__(self, name: str) -> bool:
        return name in self._data and self._data[name] is not None

    def _get(self, name: str, kinds: tuple[type, ...], label: str, default: Any) -> Any:
        if name not in self._data or self._data[name] is None:
            if default is _MISSING:
                raise InvalidInput(f"field {name!r} is required")
            return default
        value = self._data[name]
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            raise InvalidInput(f"field {name!r} must be {label}")
        return value

    def text(self, name: str, default: Any = _MISSING) -> Any:
        """A string field (required unless ``default`` is given)."""
        return self._get(name, (str,), "a string", default)

    def integer(self, name: str, default: Any = _MISSING) -> Any:
        """An integer field (``true`` is not an integer)."""
        return self._get(name, (int,), "an integer", default)

    def boolean(self, name: str, default: Any = _MISSING) -> Any:
        """A boolean field."""
        return self._get(name, (bool,), "a boolean", default)

    def obj(self, name: str, default: Any = _MISSING) -> Any:
        """A JSON-object field."""
        return self._get(name, (dict,), "an object", default)

    def text_list(self, name: str, default: Any = _MISSING) -> Any:
        """A list-of-strings field."""
        value = self._get(name, (list,), "a list of strings", default)
        if value is not default and not all(isinstance(v, str) for v in value):
            raise InvalidInput(f"field {name!r} must be a list of strings")
        return value


def strict_utf8(raw: object, what: str) -> None:
    """Raise ``InvalidInput`` unless the percent-decoded ``raw`` bytes are UTF-8."""
    if not isinstance(raw, bytes):
        return
    try:
        unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput(f"{what} is not UTF-8 once its %-escapes are decoded") from None
