"""Route path templates, one grammar for the admin API and the orchestrator.

``/orders/{order_id}/items/{item}``: a template starts with ``/``; a ``{name}``
segment (an identifier, unique in the template) binds one non-empty path segment;
every other segment is literal and may not hold braces. No whitespace, control
characters, ``?`` or ``#`` anywhere; at most ``MAX_ROUTE_PATH_CHARS`` characters
and ``MAX_ROUTE_PARAMS`` params.
"""

from __future__ import annotations

import functools
import re

from picloud_shared.errors import InvalidInput
from picloud_shared.limits import MAX_ROUTE_PARAMS, MAX_ROUTE_PATH_CHARS

_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_FORBIDDEN_IN_PATH = re.compile(r"[\s\x00-\x1f\x7f?#]")

Segment = tuple[str | None, str]
"""``(param name, "")`` for a param segment, ``(None, literal)`` otherwise."""


def check_route_path(path: object) -> str:
    """Return ``path`` if it is a valid route template for a new route, else raise
    ``InvalidInput``. Besides the grammar, a new route may not hold what no request
    could reach: a ``.`` or ``..`` segment (clients resolve them away before sending)
    or a ``%`` (a request's segments are matched decoded, so ``/a%20b`` would only
    match a request for ``/a%2520b``: write the character itself)."""
    if not isinstance(path, str):
        raise InvalidInput("route paths start with '/'")
    for _, literal in parse_template(path):
        if literal in (".", ".."):
            raise InvalidInput(f"a route path may not have a {literal!r} segment")
    if "%" in path:
        raise InvalidInput("a route path may not hold '%': write the character itself")
    return path


@functools.lru_cache(maxsize=4096)
def parse_template(template: str) -> tuple[Segment, ...]:
    """The template's segments (the first is the empty one before the leading ``/``);
    raises ``InvalidInput`` on a malformed template. Cached: it runs per request."""
    if not template.startswith("/"):
        raise InvalidInput("route paths start with '/'")
    if len(template) > MAX_ROUTE_PATH_CHARS:
        raise InvalidInput(f"route paths are limited to {MAX_ROUTE_PATH_CHARS} characters")
    if _FORBIDDEN_IN_PATH.search(template):
        raise InvalidInput("route paths may not contain whitespace, control characters, '?' or '#'")
    parts: list[Segment] = []
    seen: set[str] = set()
    for segment in template.split("/"):
        m = _PARAM.fullmatch(segment)
        if m:
            name = m.group(1)
            if name in seen:
                raise InvalidInput(f"path param {name!r} appears twice")
            seen.add(name)
            if len(seen) > MAX_ROUTE_PARAMS:
                raise InvalidInput(f"a route path has at most {MAX_ROUTE_PARAMS} params")
            parts.append((name, ""))
        elif "{" in segment or "}" in segment:
            raise InvalidInput(
                f"bad path segment {segment!r}: a param is a whole segment {{identifier}}"
            )
        else:
            parts.append((None, segment))
    return tuple(parts)


def route_shape(template: str) -> str:
    """``template`` with every param's name dropped: ``/u/{id}`` and ``/u/{name}``
    match the same requests, so they are the same path (``/u/{}``)."""
    return _PARAM.sub("{}", template)
