"""Keyset pagination: ``?limit=&cursor=`` in, ``{"items", "next_cursor"}`` out.

A cursor is the urlsafe base64 (unpadded) of a JSON list: the list it belongs to
(:func:`list_of`), then the sort key of the last item answered. It is opaque to
clients; a malformed one is 422, and so is one another list gave (which would
otherwise position this list by a key of that one, skipping items unseen).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable, Sequence
from typing import TypeVar

import attrs
from starlette.requests import Request
from starlette.responses import Response

from manager_core.api._http import json_response
from picloud_shared import wire
from picloud_shared.errors import InvalidInput
from picloud_shared.limits import DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT
from picloud_shared.wire import Json

T = TypeVar("T")
Key = tuple[str, ...]


ANOTHER_LISTS_CURSOR = (
    "this cursor belongs to another list (another path, or other query parameters "
    "than limit): ask again without it"
)


def list_of(request: Request) -> str:
    """Which list a request pages through: its path and every query parameter but
    ``limit`` and ``cursor`` (order aside), as a short digest."""
    params = sorted(
        (k, v) for k, v in request.query_params.multi_items() if k not in ("limit", "cursor")
    )
    text = json.dumps([request.url.path, params], separators=(",", ":"))
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=9).digest()
    return base64.urlsafe_b64encode(digest).decode("ascii")


def encode_cursor(key: Key, list_id: str) -> str:
    """The opaque cursor for a sort key of the list ``list_id``."""
    raw = json.dumps([list_id, *key], separators=(",", ":"), ensure_ascii=False).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_cursor(cursor: str, size: int, list_id: str) -> Key:
    """The sort key (``size`` strings) in ``cursor``, a cursor of the list ``list_id``.
    Raises ``InvalidInput``."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        key = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise InvalidInput("malformed cursor") from None
    if (
        not isinstance(key, list)
        or len(key) != size + 1
        or not all(isinstance(part, str) for part in key)
        or wire.unstorable(key) is not None  # a NUL or half a surrogate pair
    ):
        raise InvalidInput("malformed cursor")
    if key[0] != list_id:
        raise InvalidInput(ANOTHER_LISTS_CURSOR)
    return tuple(key[1:])


@attrs.frozen
class PageRequest:
    """One page asked for: at most ``limit`` items after ``after``."""

    limit: int
    after: Key | None
    list_id: str  # the list it pages through (list_of): its cursors name it

    @classmethod
    def from_request(cls, request: Request, key_size: int = 1) -> PageRequest:
        """Read ``limit`` (1..1000, default 100) and ``cursor``. Raises ``InvalidInput``."""
        raw_limit = request.query_params.get("limit")
        limit = DEFAULT_LIST_LIMIT
        if raw_limit is not None:
            if not (raw_limit.isascii() and raw_limit.isdigit()):
                raise InvalidInput(f"limit must be an integer from 1 to {MAX_LIST_LIMIT}")
            limit = int(raw_limit)
            if not 1 <= limit <= MAX_LIST_LIMIT:
                raise InvalidInput(f"limit must be an integer from 1 to {MAX_LIST_LIMIT}")
        list_id = list_of(request)
        cursor = request.query_params.get("cursor")
        after = None if not cursor else decode_cursor(cursor, key_size, list_id)
        return cls(limit, after, list_id)

    @property
    def fetch(self) -> int:
        """How many rows to ask the repo for: one extra tells whether more exist
        (repos list up to ``MAX_LIST_FETCH``: a full page and one)."""
        return self.limit + 1

    def respond(
        self, rows: Sequence[T], key: Callable[[T], Key], to_wire: Callable[[T], Json]
    ) -> Response:
        """Answer a page from up to ``fetch`` rows."""
        page = list(rows[: self.limit])
        # A page cut by its size in bytes (postgres._pages) is followed by the rest.
        more = len(rows) > self.limit or getattr(rows, "cut", False)
        next_cursor = encode_cursor(key(page[-1]), self.list_id) if more and page else None
        return json_response({"items": [to_wire(r) for r in page], "next_cursor": next_cursor})
