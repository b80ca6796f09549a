"""JSON wire helpers shared by every wire form.

A *wire form* is the JSON-compatible ``dict`` a domain value becomes when it is
stored in a JSONB column, sent to a worker, or answered over HTTP. Every domain
class offers ``to_wire()`` and a ``from_wire()`` named constructor; ``from_wire``
raises :class:`WireError` (a ``ValueError``) on anything it cannot decode.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any, TypeAlias, TypeVar

Json: TypeAlias = bool | int | float | str | list["Json"] | dict[str, "Json"] | None
JsonObject: TypeAlias = dict[str, Json]

E = TypeVar("E", bound=enum.Enum)


class WireError(ValueError):
    """A wire form could not be decoded."""


def dumps(value: Json) -> str:
    """Compact, deterministic JSON text (keys kept in insertion order, no NaN)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def loads(text: str | bytes) -> Json:
    """Parse JSON text; raises :class:`WireError` on malformed input."""
    try:
        return json.loads(text)  # type: ignore[no-any-return]
    except (ValueError, UnicodeDecodeError) as exc:
        raise WireError(f"malformed JSON: {exc}") from exc


def obj(value: object, what: str) -> Mapping[str, Any]:
    """Check that ``value`` is a JSON object."""
    if not isinstance(value, Mapping):
        raise WireError(f"{what} must be an object")
    return value


def field(data: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    """Read a required field of a given JSON type (``bool`` is never an ``int``)."""
    if name not in data:
        raise WireError(f"missing field {name!r}")
    value = data[name]
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise WireError(f"field {name!r} has the wrong type")
    if not isinstance(value, kind):
        raise WireError(f"field {name!r} has the wrong type")
    return value


def enum_value(cls: type[E], value: object) -> E:
    """Decode an enum from its wire value."""
    try:
        return cls(value)
    except ValueError as exc:
        allowed = ", ".join(str(m.value) for m in cls)
        raise WireError(f"{value!r} is not one of: {allowed}") from exc


def timestamp(value: object) -> datetime:
    """Decode an ISO-8601 timestamp with a UTC offset."""
    if not isinstance(value, str):
        raise WireError("timestamp must be a string")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise WireError(f"bad timestamp {value!r}") from exc
    if parsed.tzinfo is None:
        raise WireError("timestamp must carry a UTC offset")
    return parsed
