"""JSON wire helpers shared by every wire form.

A *wire form* is the JSON-compatible ``dict`` a domain value becomes when it is
stored in a JSONB column, sent to a worker, or answered over HTTP. Every domain
class offers ``to_wire()`` and a ``from_wire()`` named constructor; ``from_wire``
raises :class:`WireError` (a ``ValueError``) on anything it cannot decode.
"""

from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TypeAlias, TypeVar

from picloud_shared.limits import MAX_JSON_DEPTH

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


def storable_text(text: str) -> str:
    """``text`` as PostgreSQL can store it: no ``text`` column nor ``jsonb`` string
    holds a NUL, which becomes U+FFFD (as undecodable bytes do)."""
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _finite(text: str) -> float:
    value = float(text)
    if value in (math.inf, -math.inf):
        raise ValueError(f"{text[:40]} is out of range")
    if value == 0.0 and _NONZERO_DIGIT.search(text.partition("e")[0].partition("E")[0]):
        # below the smallest float (1e-400): it would be stored as 0, silently
        raise ValueError(f"{text[:40]} is out of range (too small for a float)")
    return value


_NONZERO_DIGIT = re.compile(r"[1-9]")


def unstorable(value: Json) -> str | None:
    """Why a string (or key) of ``value`` cannot be stored in ``jsonb``, if one cannot:
    a NUL, or half a surrogate pair. Walks the whole value; callers check the JSON
    text for ``\\u0000`` first (``holds_nul``: most values have none)."""
    if isinstance(value, str):
        if "\x00" in value:
            return "a string holds \\u0000, which PostgreSQL cannot store"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "a \\u escape leaves half a surrogate pair"
        return None
    if isinstance(value, list):
        return next(filter(None, map(unstorable, value)), None)
    if isinstance(value, dict):
        for k, v in value.items():
            why = unstorable(k) or unstorable(v)
            if why is not None:
                return why
    return None


# A JSON string (its escapes included), for text_too_deep to drop.
_STRING_TEXT = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_STRING_BYTES = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_EMPTY_CONTAINERS = re.compile(rb"\{\}|\[\]")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def text_too_deep(text: str | bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether valid JSON ``text`` nests arrays and objects more than ``limit`` levels
    deep, read off the text: strings dropped, then the brackets alone, each round
    removing the empty containers (the innermost level). All of it runs in C: walking
    the parsed value in Python took 0.35 s for a 1 MiB ``[{},{},…]``, on the event loop."""
    bare = (
        _STRING_TEXT.sub("", text).encode()
        if isinstance(text, str)
        else _STRING_BYTES.sub(b"", text)
    )
    brackets = bare.translate(None, _NOT_BRACKETS)
    for _ in range(limit):
        if not brackets:
            return False
        brackets = _EMPTY_CONTAINERS.sub(b"", brackets)
    return bool(brackets)


# A JSON number with an exponent: sign, integer digits, fraction digits, exponent.
_EXPONENT_NUMBER_TEXT = re.compile(r"(-?)(\d+)(?:\.(\d+))?[eE]([-+]?\d+)")
_EXPONENT_NUMBER_BYTES = re.compile(rb"(-?)(\d+)(?:\.(\d+))?[eE]([-+]?\d+)")
_MAYBE_EXPONENT_TEXT = re.compile(r"\d[eE]")
_MAYBE_EXPONENT_BYTES = re.compile(rb"\d[eE]")


#: What a size error adds when a number's exponent made the difference.
AS_KEPT = "a number's exponent is kept as the digits it stands for: 1e300 takes 301 bytes"


def exponent_growth(text: str | bytes) -> int:
    """How many bytes more than the JSON ``text`` PostgreSQL's ``jsonb`` keeps of it:
    a number is stored as ``numeric``, in positional notation, so an exponent stands
    for its digits (``1e300`` is kept as 301 bytes, ``1.5e-5`` as ``0.000015``). Size
    limits count a value as it is kept. Read off the text in C (strings dropped, then
    the numbers with an exponent found); only those numbers cost Python work."""
    if isinstance(text, str):
        if _MAYBE_EXPONENT_TEXT.search(text) is None:
            return 0
        numbers = _EXPONENT_NUMBER_TEXT.findall(_STRING_TEXT.sub("", text))
    else:
        if _MAYBE_EXPONENT_BYTES.search(text) is None:
            return 0
        numbers = _EXPONENT_NUMBER_BYTES.findall(_STRING_BYTES.sub(b"", text))
    growth = 0
    for sign, whole, fraction, exponent in numbers:
        digits = len(whole) + len(fraction)
        scale = int(exponent) - len(fraction)  # the value is digits * 10**scale
        if scale >= 0:
            kept = digits + scale
        elif digits > -scale:
            kept = digits + 1  # a point among the digits
        else:
            kept = 2 - scale  # "0." and -scale digits after the point
        # the text held sign, digits, point (if any), "e" and the exponent
        written = len(sign) + digits + (1 if fraction else 0) + 1 + len(exponent)
        growth += len(sign) + kept - written
    return max(growth, 0)


def depth_problem(value: object, text: str | bytes, limit: int = MAX_JSON_DEPTH) -> str | None:
    """Why ``value`` (parsed from, or serialized as, ``text``) nests too deeply, or
    ``None``. A text with fewer brackets than the limit is not looked at further."""
    brackets = (
        text.count("[") + text.count("{")
        if isinstance(text, str)
        else (text.count(b"[") + text.count(b"{"))
    )
    if brackets <= limit or not isinstance(value, dict | list) or not text_too_deep(text, limit):
        return None
    return f"JSON nests more than {limit} levels deep"


def unstorable_json(value: object, text: str) -> str | None:
    """Why ``value``, serialized as the JSON ``text``, cannot be stored (a NUL, or
    nesting past ``MAX_JSON_DEPTH``), or ``None``: what the host-call checks and the
    repos refuse before PostgreSQL sees it."""
    if holds_nul(text, value):  # type: ignore[arg-type]
        return "holds a NUL character, which PostgreSQL cannot store"
    return depth_problem(value, text)


def holds_nul(text: str, value: Json) -> bool:
    """Whether ``value``, serialized as the JSON ``text``, holds a NUL in a string or
    a key, which no ``jsonb`` string can store. ``dumps`` writes a NUL as
    ``\\u0000``; only a text that has one is walked."""
    return "\\u0000" in text and unstorable(value) is not None


def loads_untrusted(raw: bytes) -> Json:
    """Parse a client's JSON body as strictly as storing it will be: besides malformed
    text, reject what Python's parser lets through but JSON or PostgreSQL's
    ``jsonb`` does not — ``NaN``/``Infinity``, numbers too large for a float
    (``1e400``), a ``\\u0000`` escape, a ``\\uD800`` escape that leaves half a
    surrogate pair — and nesting past ``MAX_JSON_DEPTH``. Raises :class:`WireError`."""
    try:
        value = json.loads(raw, parse_constant=_reject_constant, parse_float=_finite)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise WireError(f"malformed JSON: {exc}") from None
    deep = depth_problem(value, raw)
    if deep is not None:
        raise WireError(deep)
    # The bytes are valid UTF-8 and JSON forbids raw control characters in strings:
    # only an escape can make a NUL or half a surrogate pair. Most bodies have none.
    if re.search(rb"\\u(?:0000|[dD][89a-fA-F])", raw):
        try:
            why = unstorable(value)
        except RecursionError:
            why = "nested too deeply"
        if why is not None:
            raise WireError(f"unstorable JSON: {why}")
    return value  # type: ignore[no-any-return]


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


def timestamp_text(value: datetime) -> str:
    """A timestamp as the API writes every one: ISO 8601 in UTC, with microseconds
    always (``2026-11-28T22:23:01.000000+00:00``), whatever the database's or the
    node's time zone, so that one instant always reads the same."""
    return value.astimezone(UTC).isoformat(timespec="microseconds")


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
