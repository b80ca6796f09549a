"""Host-side checks of host-API arguments (API.md limits), shared by the bridge
and :class:`~executor_core.memory_host.MemoryHostApi`.

Each check returns the value it accepted or raises the ``PicloudError`` a script
sees: ``InvalidInput`` for a wrong type, an empty key or id, or a ``limit``
outside 1-1000, ``InvalidName`` for a bad collection name, ``LimitExceeded`` for a
key or id past its length,
``PayloadTooLarge`` for a value or document over its size. A list's or query's
``after`` is ``None`` or checked as a key or document id is (the same codes).
Text that is not valid Unicode (half a surrogate pair, which a ``\\ud800`` escape
in a frame makes) is ``InvalidInput``: data is refused, never altered. So is an
integer of more than ``frames.MAX_INT_DIGITS`` digits (a frame carries one as a
``LongInt``).
"""

from __future__ import annotations

import re
from typing import Any

from executor_core import frames
from picloud_shared import wire
from picloud_shared.errors import InvalidInput, InvalidName, LimitExceeded, PayloadTooLarge
from picloud_shared.limits import (
    MAX_COLLECTION_CHARS,
    MAX_DOCUMENT_BYTES,
    MAX_DOCUMENT_ID_CHARS,
    MAX_KV_KEY_BYTES,
    MAX_KV_VALUE_BYTES,
    MAX_LIST_LIMIT,
    MAX_WHERE_FIELDS,
)

_COLLECTION = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_COLLECTION_CHARS}}}")


def _utf8(value: str, what: str) -> bytes:
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(
            f"{what} holds half a surrogate pair, which is not valid Unicode"
        ) from None


def key(value: object, what: str = "a key") -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be a string")
    if not value:
        raise InvalidInput(f"{what} must not be empty")
    if "\x00" in value:
        raise InvalidInput(f"{what} must not contain NUL characters")
    if len(_utf8(value, what)) > MAX_KV_KEY_BYTES:
        raise LimitExceeded(f"{what} is at most {MAX_KV_KEY_BYTES} bytes")
    return value


def after_key(value: object) -> str | None:
    """``ctx.kv.list``'s ``after``: ``None``, or checked as a key is (same codes)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidInput("after must be a key (a string) or None")
    return key(value, "after (a key)")


def prefix(value: object) -> str:
    if not isinstance(value, str) or "\x00" in value:
        raise InvalidInput("a prefix must be a string without NUL characters")
    if len(_utf8(value, "a prefix")) > MAX_KV_KEY_BYTES:
        raise LimitExceeded(f"a prefix is at most {MAX_KV_KEY_BYTES} bytes")
    return value


_AS_KEPT = f" ({wire.AS_KEPT})"


def _size(value: object, what: str) -> int:
    """``value``'s size as compact JSON, as PostgreSQL keeps it (UTF-8 bytes)."""
    try:
        text = frames.dumps(value)
    except TypeError as exc:  # not a JSON type, or an integer too long for JSON
        raise InvalidInput(f"{what} must be JSON: {exc}") from None
    except (ValueError, RecursionError):
        raise InvalidInput(f"{what} must be JSON (no NaN or Infinity)") from None
    size = len(_utf8(text, what))
    problem = wire.unstorable_json(value, text)
    if problem is not None:
        raise InvalidInput(f"{what}: {problem}")
    return size + wire.exponent_growth(text)  # as PostgreSQL keeps it


def json_value(value: object) -> Any:
    return sized_json_value(value)[0]


def sized_json_value(value: object) -> tuple[Any, int]:
    """The value and its size as JSON (UTF-8 bytes)."""
    size = _size(value, "a value")
    if size > MAX_KV_VALUE_BYTES:
        raise PayloadTooLarge(f"a value is at most {MAX_KV_VALUE_BYTES} bytes as JSON{_AS_KEPT}")
    return value, size


def document(value: object) -> dict[str, Any]:
    return sized_document(value)[0]


def sized_document(value: object) -> tuple[dict[str, Any], int]:
    """The document and its size as JSON (UTF-8 bytes)."""
    if not isinstance(value, dict):
        raise InvalidInput("a document must be a JSON object")
    size = _size(value, "a document")
    if size > MAX_DOCUMENT_BYTES:
        raise PayloadTooLarge(f"a document is at most {MAX_DOCUMENT_BYTES} bytes as JSON{_AS_KEPT}")
    return value, size


def where(value: object) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidInput("where must be an object of field: value")
    if len(value) > MAX_WHERE_FIELDS:
        raise LimitExceeded(f"where has at most {MAX_WHERE_FIELDS} fields")
    _size(value, "where")
    return value


def collection(value: object) -> str:
    if not isinstance(value, str) or not _COLLECTION.fullmatch(value):
        raise InvalidName(f"a collection name is 1-{MAX_COLLECTION_CHARS} of [A-Za-z0-9_-]")
    return value


def doc_id(value: object, what: str = "a document id") -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be a string")
    if "\x00" in value:
        raise InvalidInput(f"{what} must not contain NUL characters")
    _utf8(value, what)
    if not value:
        raise InvalidInput(f"{what} must not be empty")
    if len(value) > MAX_DOCUMENT_ID_CHARS:
        raise LimitExceeded(f"{what} is 1-{MAX_DOCUMENT_ID_CHARS} characters")
    return value


def after_doc_id(value: object) -> str | None:
    """``ctx.docs.query``'s ``after``: ``None``, or checked as a document id is."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidInput("after must be a document id (a string) or None")
    return doc_id(value, "after (a document id)")


def limit(value: object) -> int:
    if isinstance(value, frames.LongInt):
        raise InvalidInput(f"limit must be between 1 and {MAX_LIST_LIMIT}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput("limit must be an integer")
    if not 1 <= value <= MAX_LIST_LIMIT:
        raise InvalidInput(f"limit must be between 1 and {MAX_LIST_LIMIT}")
    return value
