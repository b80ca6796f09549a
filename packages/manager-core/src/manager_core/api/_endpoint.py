"""Declaring admin endpoints: who may call them and what runs.

An :class:`Resource` is one path with a handler per method. Every call goes
through :func:`_dispatch`, which authenticates, checks access, runs the handler
and turns every error into the API's JSON error body::

    unknown method on a known path   → 405 (with Allow)
    PicloudError                     → its status and {"error": {"code", "message"}}
    any other exception              → 500 "internal error" (logged, never leaked)
"""

from __future__ import annotations

import enum
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import attrs
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route

from manager_core.api._http import (
    Fields,
    error_response,
    internal_error_response,
    path_uuid,
    read_json,
    strict_utf8,
)
from manager_core.db import is_retryable_conflict, is_unavailable, unavailable_message
from manager_core.outage_log import OutageLog
from manager_core.postgres.users import User
from picloud_shared.errors import (
    Busy,
    Forbidden,
    MethodNotAllowed,
    NotFound,
    PicloudError,
    Unavailable,
)
from picloud_shared.ids import AppId
from picloud_shared.principals import Capability, Principal

if TYPE_CHECKING:
    from manager_core.api.deps import AdminDeps

logger = logging.getLogger("manager_core.api")

# While the database is away every admin request is refused 503: that is logged when
# it starts, at most once per this many seconds while it lasts (with how many were
# refused), and when a request is served again; not one line per request.
UNAVAILABLE_LOG_SECONDS = 10.0


def refusal_log(clock: Callable[[], float] = time.monotonic) -> OutageLog:
    """The log of the admin requests refused for the database being away (one per
    ``AdminDeps``)."""
    return OutageLog(
        logger,
        "admin API: serving requests",
        then="they are answered 503",
        every=UNAVAILABLE_LOG_SECONDS,
        clock=clock,
    )


class Access(enum.Enum):
    """Who may call an endpoint that is not about one app."""

    ANY_USER = "any_user"
    INSTANCE_ADMIN = "instance_admin"


@attrs.frozen
class Call:
    """One authorised call: the request, the caller and (for app routes) the app."""

    request: Request
    deps: AdminDeps
    user: User
    principal: Principal | None = None

    @property
    def app_id(self) -> AppId:
        """The app of an app-scoped call."""
        assert self.principal is not None, "not an app-scoped endpoint"
        return self.principal.app_id

    def path(self, name: str) -> str:
        """A path parameter. ``InvalidInput`` when it holds a U+FFFD the path did not
        spell: the server decodes an escape that is no UTF-8 (``%ff``) to one, so
        ``kv/%ff`` and ``kv/%fe`` would name the same key."""
        value = str(self.request.path_params[name])
        if "\ufffd" in value:
            strict_utf8(self.request.scope.get("raw_path"), "the request path")
        return value

    def query(self, name: str, default: str = "") -> str:
        """A query parameter, refused as :meth:`path` refuses."""
        value = self.request.query_params.get(name, default)
        if "\ufffd" in value:
            strict_utf8(self.request.scope.get("query_string"), "the query string")
        return value

    async def fields(self) -> Fields:
        """The JSON object body."""
        return Fields.of(await read_json(self.request))


Handler = Callable[[Call], Awaitable[Response]]


@attrs.frozen
class Operation:
    """One method of a resource: its access rule, its handler, and the capabilities
    it needs besides ``access`` (an app route's)."""

    access: Capability | Access
    handler: Handler
    also: frozenset[Capability] = frozenset()


R = TypeVar("R", Route, Mount)


def match_any_text(route: R) -> R:
    """Let the route's ``{…:path}`` parts (a mount's rest) match a line break too:
    starlette's ``.*`` stops at one, so a key or an id holding a newline (``%0A`` in
    the URL) would miss its endpoint and meet the host app's plain 404 instead."""
    route.path_regex = re.compile(route.path_regex.pattern, re.DOTALL)
    return route


class Resource(Route):
    """One admin path and its operations by method (every method reaches us, so
    unknown ones answer a JSON 405 rather than the host app's plain text)."""

    def __init__(self, path: str, deps: AdminDeps, operations: dict[str, Operation]) -> None:
        self.operations = operations
        self.deps = deps
        super().__init__(path, self._dispatch, name=path)
        self.methods = None  # every method is ours to answer (405 included)
        match_any_text(self)

    async def _dispatch(self, request: Request) -> Response:
        try:
            operation = self.operations.get(request.method)
            if operation is None:
                # 401 before anything else: without a token the API shows nothing.
                await self.deps.auth.user(request.headers.get("authorization"))
                allowed = ", ".join(sorted(self.operations))
                raise MethodNotAllowed(f"{request.method} is not allowed here (only {allowed})")
            call = await _authorise(request, self.deps, operation.access)
            for capability in sorted(operation.also):
                assert call.principal is not None, "also: only on app routes"
                if not call.principal.can(capability):
                    raise Forbidden(f"this needs the {capability} capability as well")
            response = await operation.handler(call)
        except MethodNotAllowed as exc:
            return error_response(exc, allow=sorted(self.operations))
        except PicloudError as exc:
            return error_response(exc)
        except Exception as exc:
            if is_retryable_conflict(exc):  # whatever in_transaction could not absorb
                logger.warning("admin API: %s %s kept conflicting", request.method, self.path)
                return error_response(Busy("concurrent work kept conflicting; try again"))
            if is_unavailable(exc):
                return _unavailable(self.deps, exc)
            logger.exception("admin API: unexpected error on %s %s", request.method, self.path)
            return internal_error_response()
        # Authenticated (a database query) and served: the database answers.
        self.deps.refusals.succeeded()
        return response


def _unavailable(deps: AdminDeps, exc: Exception) -> Response:
    """503 (``Retry-After``): the database is out of reach or did not answer in time
    (logged as ``deps.refusals`` allows)."""
    deps.refusals.counted(exc)
    return error_response(Unavailable(f"{unavailable_message(exc)}; try again"))


async def _authorise(request: Request, deps: AdminDeps, access: Capability | Access) -> Call:
    user = await deps.auth.user(request.headers.get("authorization"))
    if access is Access.ANY_USER:
        return Call(request, deps, user)
    if access is Access.INSTANCE_ADMIN:
        deps.auth.require_instance_admin(user)
        return Call(request, deps, user)
    app_id = AppId(path_uuid(request, "id", "app"))
    principal = await deps.auth.principal(user, app_id, access)
    return Call(request, deps, user, principal)


def not_found_route(deps: AdminDeps) -> Route:
    """The catch-all that answers every unknown admin path with a JSON 404 (a 401
    without a valid token, as every admin path does)."""

    async def not_found(request: Request) -> Response:
        try:
            await deps.auth.user(request.headers.get("authorization"))
        except PicloudError as exc:
            return error_response(exc)
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            return _unavailable(deps, exc)
        return error_response(NotFound("no such admin endpoint"))

    route = Route("/{rest:path}", not_found, name="not_found")
    route.methods = None
    return match_any_text(route)
