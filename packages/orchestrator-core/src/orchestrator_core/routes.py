"""The user-route orchestrator: ``{METHOD} /apps/{app_name}{route_path}``.

Matches the request against the app's routes, builds the HTTP event, and writes
one outbox row through :class:`~picloud_shared.ports.OutboxWriter`:

* ``async`` routes answer ``202 {"accepted_at", "execution_id"}`` at once, unless
  the app has as many executions queued as its :class:`AsyncBacklog` admits (503
  ``overloaded`` with ``Retry-After``, before the body is read);
* ``sync`` routes wait up to ``admission_wait_seconds`` for a free slot of the
  execution gate (503 with ``Retry-After`` when none frees) before their body is
  read, register an inbox receiver, write the row with ``reply_to``, and wait up
  to the script's ``timeout_seconds`` + 2 s for the dispatcher's answer.

A body is read only within its bounds: ``max_body_bytes`` (413), a share of the
node's :class:`~orchestrator_core.body_budget.BodyBudget` (503 ``overloaded``
when none comes free in time) and ``body_read_timeout_seconds`` (408
``request_timeout``). A sync request whose body is still arriving after
``body_slot_hold_seconds`` gives its slot back and is admitted again once the
body is whole: a slow client never holds an execution slot for long. Nothing of
a body outlives the write of its row; a sync request then waits holding none.

It never imports manager-core: routes come from a ``RouteTable``, answers from the
``InboxRegistry``.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import anyio
import anyio.to_thread
import attrs
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route, request_response
from starlette.types import ASGIApp, Receive, Scope, Send

from orchestrator_core.body_budget import BodyBudget
from orchestrator_core.inbox import InboxRegistry
from orchestrator_core.paths import match_segments, request_segments, specificity
from orchestrator_core.request_body import (
    PARSE_IN_THREAD_BYTES,
    BodyOverBudget,
    BodyTimedOut,
    BodyTooLarge,
    JsonTooLarge,
    http_event,
    parsed_share,
    read_body,
)
from orchestrator_core.route_cache import CachedRouteTable
from picloud_shared import wire
from picloud_shared.domain import APP_NAME_RE, DispatchMode, RouteTarget
from picloud_shared.errors import NotFound, Unavailable
from picloud_shared.events import HttpEvent
from picloud_shared.gate import ExecutionGate, Permit
from picloud_shared.ids import ExecutionId, InboxId, new_execution_id
from picloud_shared.inbox import InboxResult
from picloud_shared.limits import (
    BODY_BUDGET_WAIT_SECONDS,
    BODY_READ_TIMEOUT_SECONDS,
    BODY_SLOT_HOLD_SECONDS,
    MAX_BODY_BYTES_IN_FLIGHT,
    MAX_REQUEST_BODY_BYTES,
    MAX_REQUEST_HEADER_BYTES,
    MAX_REQUEST_HEADERS,
    SYNC_WAIT_BUFFER_SECONDS,
)
from picloud_shared.noop import UnboundedBacklog
from picloud_shared.outbox import HttpDispatchPayload, NewOutboxRow, OutboxSourceKind
from picloud_shared.ports import AsyncBacklog, OutboxWriter, RouteTable
from picloud_shared.responses import NO_CONTENT_STATUSES
from picloud_shared.status import InboxFailureKind, http_status_for

# Headers the server computes itself (uvicorn sends its own ``date``: a script's
# would be a second one, and RFC 9110 6.6.1 allows one), and the hop-by-hop ones
# (RFC 9110 7.6.1): a script cannot set them.
_HOP_HEADERS = frozenset(
    {
        "content-length",
        "date",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
    }
)
# Where a request whose row was written leaves its execution id, in the ASGI
# scope's ``state`` (``request.state``), for the access log (picloud.access_log).
EXECUTION_ID_STATE = "execution_id"

log = logging.getLogger("picloud.routes")
DISCONNECT_WATCH_AFTER = 0.05  # seconds a sync request waits before watching its client
# How long a sync request whose execution was committing when its wait ended waits
# for the answer (it comes right after the commit).
HELD_ANSWER_WAIT_SECONDS = 60.0


class _AnyMethod:
    """An ASGI endpoint for every method: starlette leaves a route's methods open
    only when its endpoint is an ASGI app, not a function."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)


# While the database is away every request is refused: one line per this many seconds
# says so (one a request was 36 000 lines in 90 s), with how many were refused since.
UNAVAILABLE_LOG_SECONDS = 10.0


class Refusals:
    """Counts the requests refused 503 ``unavailable`` and logs them in one line at
    most once per ``UNAVAILABLE_LOG_SECONDS`` (``clock``: a monotonic one)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._logged_at: float | None = None
        self._refused = 0  # since the last line, this one included

    def refused(self, exc: Unavailable) -> JSONResponse:
        """The 503 for a request refused while the database cannot be reached (nothing
        was written: try again), logged as the interval allows."""
        self._refused += 1
        now = self._clock()
        if self._logged_at is None or now - self._logged_at >= UNAVAILABLE_LOG_SECONDS:
            self._log(exc, now)
        return _error(503, exc.code, f"{exc}; retry later", headers={"Retry-After": "1"})

    def _log(self, exc: Unavailable, now: float) -> None:
        if self._refused > 1:
            log.warning(
                "user route: %s (%d requests refused since the previous line; logged at most"
                " once per %g s)",
                exc,
                self._refused,
                UNAVAILABLE_LOG_SECONDS,
            )
        else:
            log.warning("user route: %s", exc)
        self._logged_at = now
        self._refused = 0


def _error(
    status: int,
    code: str,
    message: str,
    execution_id: ExecutionId | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {
        "error": {
            "code": code,
            "message": message,
            "execution_id": None if execution_id is None else str(execution_id),
        }
    }
    return JSONResponse(body, status_code=status, headers=headers)


def _failure(
    kind: InboxFailureKind,
    message: str,
    execution_id: ExecutionId | None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return _error(http_status_for(kind), kind.value, message, execution_id, headers)


def _has_body(request: Request) -> bool:
    headers = request.headers
    return "transfer-encoding" in headers or headers.get("content-length", "0") != "0"


def _closing(response: Response) -> Response:
    """An answer sent before the body was read whole: the connection closes after it,
    so a client still sending (slowly, or a body it was told is too large) holds
    nothing more."""
    response.headers["connection"] = "close"
    return response


@attrs.define
class UserRouteOrchestrator:
    """Serves user routes; mount :meth:`routes` at the root of the ASGI app."""

    route_table: RouteTable
    outbox: OutboxWriter
    inbox: InboxRegistry
    gate: ExecutionGate
    node_id: str
    max_body_bytes: int = MAX_REQUEST_BODY_BYTES
    wait_buffer_seconds: float = SYNC_WAIT_BUFFER_SECONDS
    retry_after_seconds: int = 1
    #: How long a sync request waits for a gate slot before it is refused with 503.
    admission_wait_seconds: float = 1.0
    #: The node's bound on request bodies held at once (``MAX_BODY_BYTES_IN_FLIGHT``).
    body_budget: BodyBudget = attrs.field(factory=lambda: BodyBudget(MAX_BODY_BYTES_IN_FLIGHT))
    body_budget_wait_seconds: float = BODY_BUDGET_WAIT_SECONDS
    body_read_timeout_seconds: float = BODY_READ_TIMEOUT_SECONDS
    body_slot_hold_seconds: float = BODY_SLOT_HOLD_SECONDS
    #: Bounds each app's queued executions for its async routes.
    backlog: AsyncBacklog = attrs.field(factory=UnboundedBacklog)
    #: Requests refused while the database is away, and their rate-limited log line.
    refusals: Refusals = attrs.field(factory=Refusals)

    def routes(self) -> list[BaseRoute]:
        # Every method reaches ``handle`` (TRACE, PROPFIND, … included), which answers
        # 404 and 405 itself, as JSON: starlette's own 405 is plain text.
        endpoint = _AnyMethod(request_response(self.handle))
        anywhere = Route("/apps/{app_name}/{route_path:path}", endpoint)
        # starlette's ``.*`` stops at a line break: a path param holding one (``%0A``)
        # must reach its route too.
        anywhere.path_regex = re.compile(anywhere.path_regex.pattern, re.DOTALL)
        return [Route("/apps/{app_name}", endpoint), anywhere]

    def _match(
        self, targets: Sequence[RouteTarget], method: str, segments: list[str]
    ) -> tuple[RouteTarget, dict[str, str]] | list[str]:
        """The matching route and its params, or the methods the path allows.

        Of the routes of ``method`` that match, the most specific wins
        (:func:`~orchestrator_core.paths.specificity`: at the first segment where two
        differ, a literal beats a param), whatever order ``targets`` come in; two
        equally specific ones (the same path up to its params' names, which the admin
        API refuses: 409) are told apart by their paths' text. A HEAD
        request with no HEAD route for its path is served by the path's GET route
        (the server sends its headers without the body), so a path with a GET route
        also allows HEAD."""
        best: dict[str, tuple[tuple[tuple[bool, ...], str], RouteTarget, dict[str, str]]] = {}
        for target in targets:  # the most specific route of each method that matches
            params = match_segments(target.path, segments)
            if params is None:
                continue
            rank = (specificity(target.path), target.path)
            kept = best.get(target.method)
            if kept is None or rank < kept[0]:
                best[target.method] = (rank, target, params)
        chosen = best.get(method) or (best.get("GET") if method == "HEAD" else None)
        if chosen is not None:
            return chosen[1], chosen[2]
        return sorted({*best, "HEAD"} if "GET" in best else set(best))

    async def handle(self, request: Request) -> Response:
        raw_headers = request.scope["headers"]
        if len(raw_headers) > MAX_REQUEST_HEADERS or (
            sum(len(k) + len(v) for k, v in raw_headers) > MAX_REQUEST_HEADER_BYTES
        ):
            return _error(
                431,
                "headers_too_large",
                f"at most {MAX_REQUEST_HEADERS} request headers of "
                f"{MAX_REQUEST_HEADER_BYTES} bytes in all",
            )
        app_name = request.path_params["app_name"]
        if not APP_NAME_RE.fullmatch(app_name):  # no such app can exist: ask nobody
            return _error(404, "not_found", f"no app named {app_name!r}")
        path = "/" + request.path_params.get("route_path", "")
        segments = request_segments(request.scope, path)
        cache = self.route_table if isinstance(self.route_table, CachedRouteTable) else None
        try:
            if cache is None:
                targets, cached = await self.route_table.routes_for_app(app_name), False
            else:
                targets, cached = await cache.lookup(app_name)
            found = [] if targets is None else self._match(targets, request.method, segments)
            if cached and isinstance(found, list):
                assert cache is not None  # never answer 404/405 from the cache: it may be new
                targets = await cache.refresh(app_name)
                found = [] if targets is None else self._match(targets, request.method, segments)
        except Unavailable as exc:
            return self.refusals.refused(exc)
        if targets is None:
            return _error(404, "not_found", f"no app named {app_name!r}")
        if isinstance(found, list):
            if found:
                allowed = ", ".join(sorted(set(found)))
                return _error(
                    405,
                    "method_not_allowed",
                    f"{request.method} is not allowed here (only {allowed})",
                    headers={"Allow": allowed},
                )
            return _error(404, "not_found", f"no route for {path!r}")
        target, params = found
        try:
            if target.dispatch_mode is DispatchMode.ASYNC:
                return await self._serve_async(request, target, params, path)
            return await self._serve_sync(request, target, params, path)
        except NotFound:  # the app was deleted after its routes were cached
            if cache is not None:
                cache.invalidate(app_name)
            return _error(404, "not_found", f"no app named {app_name!r}")
        except Unavailable as exc:
            return self.refusals.refused(exc)
        except Exception:  # the failure table's JSON 500, never the server's plain text
            log.exception("user route %s %r failed", request.method, request.url.path)
            return _failure(InboxFailureKind.INTERNAL, "internal error", None)

    def _overloaded(self, message: str) -> Response:
        return _failure(
            InboxFailureKind.OVERLOADED,
            message,
            None,
            headers={"Retry-After": str(self.retry_after_seconds)},
        )

    def _body_refused(self, exc: Exception) -> Response:
        """The answer to a body refused before it was read whole; the connection closes."""
        if isinstance(exc, BodyOverBudget):
            refused = self._overloaded("too many request bodies in flight; retry later")
        elif isinstance(exc, BodyTimedOut):
            refused = _error(
                408,
                "request_timeout",
                f"the request body did not arrive within {self.body_read_timeout_seconds:g} s",
            )
        else:
            refused = _error(
                413, "payload_too_large", f"request body is larger than {self.max_body_bytes} bytes"
            )
        return _closing(refused)

    def _row(
        self,
        target: RouteTarget,
        event: HttpEvent,
        execution_id: ExecutionId,
        reply_to: InboxId | None = None,
    ) -> NewOutboxRow:
        return NewOutboxRow(
            execution_id=execution_id,
            app_id=target.app_id,
            source_kind=OutboxSourceKind.HTTP,
            payload=HttpDispatchPayload(target.route_id, event.to_wire()).to_wire(),
            script_id=target.script_id,
            route_id=target.route_id,
            reply_to=reply_to,
            reply_node=self.node_id if reply_to is not None else None,
        )

    async def _serve_async(
        self, request: Request, target: RouteTarget, params: dict[str, str], path: str
    ) -> Response:
        if not self.backlog.admit(target.app_id):  # before the body: refusing costs none
            refused = self._overloaded(
                "the app has too many executions queued; retry later "
                "(PICLOUD_MAX_QUEUED_EXECUTIONS_PER_APP)"
            )
            return _closing(refused) if _has_body(request) else refused
        execution_id = new_execution_id()
        refused = await self._write(request, target, params, path, execution_id)
        if refused is not None:
            return refused
        return JSONResponse(
            {
                "accepted_at": wire.timestamp_text(datetime.now(UTC)),
                "execution_id": str(execution_id),
            },
            status_code=202,
            headers={"Location": f"/api/v1/admin/apps/{target.app_id}/executions/{execution_id}"},
        )

    async def _serve_sync(
        self, request: Request, target: RouteTarget, params: dict[str, str], path: str
    ) -> Response:
        # Admitted before its body is read: a request the gate refuses costs no body.
        # The request holds its slot from admission on and hands it to the outbox with
        # its row: a slot only seen free could go to the next claim of queued rows,
        # and the row would then wait behind all of them.
        execution_id = new_execution_id()
        inbox_id, receiver = self.inbox.register()
        with receiver:
            permit = await self.gate.admit(self.admission_wait_seconds, owner=target.app_id)
            if permit is None:
                refused = self._overloaded("too many executions in flight; retry later")
                return _closing(refused) if _has_body(request) else refused
            refused = await self._write(  # owns the permit from here on
                request, target, params, path, execution_id, inbox_id, permit
            )
            if refused is not None:
                return refused
            wait = target.timeout_seconds + self.wait_buffer_seconds
            result, gone = await self._wait(request, receiver.receive, wait)
            if gone:  # the receiver closes: a late answer is abandoned, as it should be
                return _ClientGone()
            if result is None and receiver.held:  # committing as the wait ended
                result = await receiver.receive(HELD_ANSWER_WAIT_SECONDS)
                if result is None:
                    return _failure(
                        InboxFailureKind.INTERNAL,
                        "the execution was committing, but its answer did not come",
                        execution_id,
                    )
        # Not held when the wait ended: the receiver closes now, so the execution can
        # no longer commit (InboxRegistry.hold) and the answer below is the whole truth.
        if result is None and self.inbox.stopping:  # InboxRegistry.stop_waiting
            return _error(
                503,
                "unavailable",
                "this node is stopping; nothing of the request was kept; retry",
                execution_id,
                headers={"Retry-After": "1"},
            )
        if result is None:
            return _failure(
                InboxFailureKind.TIMEOUT,
                f"no answer within {wait:g} s (the script's timeout plus "
                f"{self.wait_buffer_seconds:g} s); nothing of the request was kept",
                execution_id,
            )
        return to_response(result)

    async def _write(
        self,
        request: Request,
        target: RouteTarget,
        params: dict[str, str],
        path: str,
        execution_id: ExecutionId,
        reply_to: InboxId | None = None,
        permit: Permit | None = None,
    ) -> Response | None:
        """Read the body, build the event and write its row: ``None`` once written,
        else the answer that refused it.

        Owns ``permit`` (a sync request's slot): it goes to the outbox with the row,
        or is released here, whatever happens. The body's share of the budget is
        released on return, and nothing of the body outlives this call."""

        def give_slot_back() -> None:  # the body is slow: do not hold a slot for it
            nonlocal permit
            if permit is not None:
                permit.release()
                permit = None

        try:
            with self.body_budget.share() as share:
                try:
                    raw = await read_body(
                        request,
                        limit=self.max_body_bytes,
                        share=share,
                        budget_wait=self.body_budget_wait_seconds,
                        timeout=self.body_read_timeout_seconds,
                        slow_after=self.body_slot_hold_seconds,
                        on_slow=give_slot_back if permit is not None else None,
                    )
                except (BodyTooLarge, BodyOverBudget, BodyTimedOut) as exc:
                    return self._body_refused(exc)
                except ClientDisconnect:
                    return _ClientGone()
                if reply_to is not None and permit is None:  # it gave its slot back
                    permit = await self.gate.admit(self.admission_wait_seconds, owner=target.app_id)
                    if permit is None:
                        return self._overloaded("too many executions in flight; retry later")
                parsed = parsed_share(request, raw, self.body_budget.capacity)
                if not await share.cover(parsed, self.body_budget_wait_seconds):
                    return self._overloaded("too many request bodies in flight; retry later")
                try:
                    if len(raw) > PARSE_IN_THREAD_BYTES:
                        event = await anyio.to_thread.run_sync(
                            http_event, request, path, params, raw, self.max_body_bytes
                        )
                    else:
                        event = http_event(request, path, params, raw, self.max_body_bytes)
                except wire.WireError as exc:
                    return _failure(InboxFailureKind.REJECTED, f"request body: {exc}", None)
                except JsonTooLarge as exc:
                    return _error(413, "payload_too_large", str(exc))
                row = self._row(target, event, execution_id, reply_to)
                if permit is None:
                    await self.outbox.enqueue(row)
                else:
                    handed, permit = permit, None  # the writer owns it from the call on
                    await self.outbox.enqueue(row, permit=handed)
                request.scope.setdefault("state", {})[EXECUTION_ID_STATE] = execution_id
                return None
        finally:
            if permit is not None:
                permit.release()

    async def _wait(
        self, request: Request, receive: object, timeout: float
    ) -> tuple[InboxResult | None, bool]:
        """Wait for the answer; give up on timeout or when the client disconnects
        (then the second item is true).

        The disconnect watcher (a task reading ``http.disconnect``) starts only after
        ``DISCONNECT_WATCH_AFTER``: most answers come well before it, and a task
        spawned and cancelled per request cost CPU and cyclic garbage (the
        cancellation's traceback). A client gone sooner is seen as soon as it starts
        (the disconnect waits in the request's queue)."""
        first = min(timeout, DISCONNECT_WATCH_AFTER)
        result: InboxResult | None = await receive(first)  # type: ignore[operator]
        if result is not None or timeout <= first:
            return result, False
        gone = False

        async def watch_disconnect(scope: anyio.CancelScope) -> None:
            nonlocal gone
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    gone = True
                    scope.cancel()
                    return

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch_disconnect, tg.cancel_scope)
            result = await receive(timeout - first)  # type: ignore[operator]
            tg.cancel_scope.cancel()
        return result, gone and result is None


class _ClientGone(Response):
    """The answer for a client that went away before it: nothing is sent (there is no
    one to send it to), so the access log shows ``-`` and not a status nobody got."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        return None


def to_response(result: InboxResult) -> Response:
    """The HTTP answer for an inbox result: the script's response or the failure body."""
    if result.response is not None:
        r = result.response
        headers: list[tuple[bytes, bytes]] = [
            (k.lower().encode("latin-1"), v.encode("latin-1", errors="replace"))
            for k, v in r.headers
            if k.lower() not in _HOP_HEADERS
        ]
        # A 204, 205 or 304 has no content: a body sent with one breaks the connection,
        # and a content-type would describe nothing.
        body = b"" if r.status in NO_CONTENT_STATUSES else r.body
        if r.status in NO_CONTENT_STATUSES:
            headers = [h for h in headers if h[0] != b"content-type"]
        response = Response(content=body, status_code=r.status)
        response.raw_headers = [
            h for h in response.raw_headers if h[0] != b"content-type"
        ] + headers
        return response
    assert result.failure is not None
    if result.failure is InboxFailureKind.INTERNAL:
        # The platform's own trouble (a worker that died, a registrant whose rights
        # lapsed): the caller learns the execution's id, its owners read the rest.
        return _failure(result.failure, "internal error", result.execution_id)
    return _failure(result.failure, result.message, result.execution_id)
