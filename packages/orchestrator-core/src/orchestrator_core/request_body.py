"""Reading a user-route request: its body within its bounds (size, budget and
time), and the route event built from it.

Exceptions, one per bound (each answered by the orchestrator)::

    Exception
     ├── BodyTooLarge      413: more than the limit, declared or streamed
     ├── BodyOverBudget    503: no share of the node's body budget came free in time
     └── BodyTimedOut      408: the body was not whole in time

A client that goes away raises starlette's ``ClientDisconnect``. The ASGI
``receive`` is awaited directly and may be cancelled when a deadline passes
(uvicorn's is cancel-safe: a message is consumed only when it is returned).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import anyio
from starlette.requests import ClientDisconnect, Request

from orchestrator_core.body_budget import BodyShare
from picloud_shared import wire
from picloud_shared.events import HttpEvent
from picloud_shared.limits import BODY_BUDGET_WAIT_SECONDS, BODY_READ_TIMEOUT_SECONDS

#: A JSON body is parsed before its row is written, and its Python objects are
#: several times its size (about 4x for typical records, up to ~25x for
#: ``[{},{},...]``). Its share of the body budget grows to this many times its
#: size (at most the whole budget) before it is parsed.
PARSED_JSON_SHARE = 8
#: A body larger than this is parsed on a worker thread: a 1 MiB JSON body takes
#: ~0.1 s to parse and check, and on the event loop that stalled every request of
#: the node for all of it. The thread holds the GIL while each C step runs (the
#: parse is one: ~40 ms for 1 MiB of ``[{},{},...]``) and lets the loop run between
#: them, so the longest stall is about half as long (58-72 ms against 111-129 ms,
#: measured with a 1 ms ticker on the loop).
PARSE_IN_THREAD_BYTES = 64 * 1024


class BodyTooLarge(Exception):
    """The request body is larger than the limit."""


class JsonTooLarge(Exception):
    """The request body's JSON is larger than the limit as PostgreSQL keeps it (its
    numbers' exponents written out as digits: ``wire.exponent_growth``)."""


class BodyOverBudget(Exception):
    """The node's body budget had no room for the request body in time."""


class BodyTimedOut(Exception):
    """The whole request body did not arrive in time."""


async def read_body(
    request: Request,
    *,
    limit: int,
    share: BodyShare,
    budget_wait: float = BODY_BUDGET_WAIT_SECONDS,
    timeout: float = BODY_READ_TIMEOUT_SECONDS,
    slow_after: float = math.inf,
    on_slow: Callable[[], None] | None = None,
) -> bytes:
    """The whole body, within its bounds: at most ``limit`` bytes, declared or
    streamed (:class:`BodyTooLarge`); covered by ``share`` as its bytes arrive,
    each part within ``budget_wait`` seconds
    (:class:`BodyOverBudget`); whole within ``timeout`` seconds
    (:class:`BodyTimedOut`). ``on_slow`` is called once if the body is not whole
    ``slow_after`` seconds in. Raises ``ClientDisconnect`` when the client goes."""
    start = anyio.current_time()
    deadline = start + timeout
    slow_at = start + slow_after if on_slow is not None else math.inf

    async def cover(size: int) -> None:
        wait = min(budget_wait, max(0.0, deadline - anyio.current_time()))
        if not await share.cover(size, wait):
            raise BodyOverBudget

    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    more = True
    while more:
        with anyio.move_on_after(min(deadline, slow_at) - anyio.current_time()) as scope:
            message = await request.receive()
        if scope.cancelled_caught:
            if anyio.current_time() >= deadline:
                raise BodyTimedOut
            assert on_slow is not None
            on_slow()
            slow_at = math.inf
            continue
        if message["type"] == "http.disconnect":
            raise ClientDisconnect
        chunk = message.get("body", b"")
        more = message.get("more_body", False)
        if chunk:
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge
            await cover(size)
            chunks.append(chunk)
    return b"".join(chunks)


def is_json_content_type(content_type: str) -> bool:
    """Whether a body of ``content_type`` is parsed into the event's ``json``: only
    ``application/json`` (any case, parameters such as ``; charset=utf-8`` allowed),
    as API.md says. Another type, ``application/*+json`` included, reaches the
    script as text with ``json: None``."""
    return content_type.split(";", 1)[0].strip().lower() == "application/json"


def parsed_share(request: Request, raw: bytes, capacity: int) -> int:
    """The budget share a body needs while it is held parsed (``PARSED_JSON_SHARE``
    times its size if it is JSON, at most ``capacity``); its size otherwise."""
    if raw and is_json_content_type(request.headers.get("content-type", "")):
        return min(len(raw) * PARSED_JSON_SHARE, capacity)
    return len(raw)


def http_event(
    request: Request, path: str, params: dict[str, str], raw: bytes, max_json_bytes: int
) -> HttpEvent:
    """The route event of a request whose body is ``raw``; ``WireError`` when a JSON
    body does not parse (or could not be stored), ``JsonTooLarge`` when it would be
    kept as more than ``max_json_bytes``."""
    parsed = None
    if raw and is_json_content_type(request.headers.get("content-type", "")):
        kept = len(raw) + wire.exponent_growth(raw)
        if kept > max_json_bytes:
            raise JsonTooLarge(
                f"request body is {kept} bytes as stored ({wire.AS_KEPT}); "
                f"the limit is {max_json_bytes} bytes"
            )
        parsed = wire.loads_untrusted(raw)
    # Event text is stored (jsonb): undecodable bytes are already U+FFFD, and so
    # becomes a NUL (from a %00 or the body), which no PostgreSQL string holds.
    text = wire.storable_text
    # A repeated header is one, its values joined as HTTP allows (RFC 9110 5.3; the
    # cookie header with "; "). A repeated query parameter keeps its last value.
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        name, value = text(name), text(value)
        if name in headers:
            value = headers[name] + ("; " if name == "cookie" else ", ") + value
        headers[name] = value
    return HttpEvent(
        method=request.method,
        path=text(path),
        params={k: text(v) for k, v in params.items()},
        query={text(k): text(v) for k, v in request.query_params.items()},
        headers=headers,
        body=text(raw.decode("utf-8", errors="replace")),
        json=parsed,
    )
