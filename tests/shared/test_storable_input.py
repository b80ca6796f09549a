"""What PostgreSQL cannot store never gets that far: strict parsing of client JSON,
NUL-free text from scripts, lossless bodies, and response headers a server can send."""

from __future__ import annotations

import base64
import json
import uuid
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from picloud_shared import wire
from picloud_shared.execution import ExecError, ExecResult, ScriptResponse
from picloud_shared.ids import ExecutionId
from picloud_shared.limits import MAX_JSON_DEPTH
from picloud_shared.responses import header_problem
from picloud_shared.status import ExecErrorKind
from tests.strategies import json_values

REFUSED = {
    "NaN": b'{"a": NaN}',
    "Infinity": b"[Infinity]",
    "-Infinity": b"-Infinity",
    "overflowing number": b'{"n": 1e400}',
    "overflowing negative number": b"-1e400",
    "underflowing number": b'{"n": 1e-400}',
    "underflowing negative number": b"[-2.5E-400]",
    "nesting past the parser": b"[" * 100_000,
    "nesting one level past MAX_JSON_DEPTH": b"[" * (MAX_JSON_DEPTH + 1)
    + b"]" * (MAX_JSON_DEPTH + 1),
    "objects one level past MAX_JSON_DEPTH": b'{"a":' * (MAX_JSON_DEPTH + 1)
    + b"1"
    + b"}" * (MAX_JSON_DEPTH + 1),
    "NUL escape in a value": b'{"a": "x\\u0000"}',
    "NUL escape in a key": b'{"\\u0000": 1}',
    "half a surrogate pair": b'["\\ud800"]',
    "a trailing high surrogate": b'"ok\\uDBFF"',
    "invalid UTF-8": b'"\xff"',
    "two values": b"1 2",
}
ACCEPTED = {
    b'"\\ud83d\\ude00"': "\U0001f600",  # a whole pair
    b'"\\\\u0000"': "\\u0000",  # an escaped backslash, then text
    b'"\\u00e9"': "é",
    b"1.5e300": 1.5e300,
    b"5e-324": 5e-324,  # the smallest float there is
    b"0e-400": 0.0,  # zero, however written
    b"-0.000e-999": -0.0,
    b"12345678901234567890": 12345678901234567890,
    b'{"a": [null, true, "x"]}': {"a": [None, True, "x"]},
    b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH: wire.loads(
        b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
    ),
    b'"[[[[{{{{"': "[[[[{{{{",  # brackets in a string are not nesting
}


@pytest.mark.parametrize("raw", REFUSED.values(), ids=REFUSED.keys())
def test_json_postgres_cannot_store_is_refused(raw: bytes) -> None:
    with pytest.raises(wire.WireError):
        wire.loads_untrusted(raw)


@pytest.mark.parametrize("raw", ACCEPTED.keys())
def test_json_postgres_can_store_is_parsed(raw: bytes) -> None:
    assert wire.loads_untrusted(raw) == ACCEPTED[raw]


def _holds_nul(value: object) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, list):
        return any(_holds_nul(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_nul(k) or _holds_nul(v) for k, v in value.items())
    return False


@given(json_values)
def test_any_json_text_parses_back_unless_a_string_holds_nul(value: object) -> None:
    raw = json.dumps(value, ensure_ascii=False).encode()
    if _holds_nul(value):
        with pytest.raises(wire.WireError, match=r"\\u0000"):
            wire.loads_untrusted(raw)
    else:
        assert wire.loads_untrusted(raw) == value
        ascii_raw = json.dumps(value, ensure_ascii=True).encode()  # \u escapes everywhere
        assert wire.loads_untrusted(ascii_raw) == value


def test_storable_text_turns_nul_into_the_replacement_character() -> None:
    assert wire.storable_text("a\x00b\x00") == "a\ufffdb\ufffd"
    assert wire.storable_text("plain") == "plain"


def test_script_text_in_a_result_is_storable() -> None:
    """Messages, tracebacks and log lines come from scripts: a NUL in them would make
    the execution's record (text and jsonb) impossible to write."""
    error = ExecError(ExecErrorKind.UNCAUGHT_EXCEPTION, "ValueError: a\x00b", "tb\x00")
    assert (error.message, error.traceback) == ("ValueError: a\ufffdb", "tb\ufffd")
    result = ExecResult.failed(ExecutionId(uuid.uuid4()), error, ("ok", "x\x00"))
    assert result.logs == ("ok", "x\ufffd")
    assert "\\u0000" not in wire.dumps(result.to_wire())


def test_a_body_with_nul_is_stored_as_base64_and_comes_back_whole() -> None:
    response = ScriptResponse(200, (("content-type", "text/plain"),), b"a\x00b")
    wired = response.to_wire()
    assert wired["body_encoding"] == "base64"
    assert base64.b64decode(str(wired["body"])) == b"a\x00b"
    assert "\\u0000" not in wire.dumps(wired)
    assert ScriptResponse.from_wire(wired) == response
    assert ScriptResponse(200, (), b"text").to_wire()["body_encoding"] == "utf-8"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("X-A", "a\r\nSet-Cookie: z=1"),
        ("X-A", "a\nb"),
        ("X-A", "nul\x00"),
        ("X-A", "del\x7f"),
        ("X A", "1"),
        ("X:A", "1"),
        ("", "1"),
        ("X-\u00e9", "1"),
        ("X-A", "euro \u20ac"),
        ("X-A", "\U0001f600"),
        ("X-A", "\ud800"),
    ],
)
def test_a_header_a_server_cannot_send_is_refused(name: str, value: str) -> None:
    assert header_problem(name, value) is not None
    wired = {"status": 200, "headers": [[name, value]], "body": "", "body_encoding": "utf-8"}
    with pytest.raises(wire.WireError):
        ScriptResponse.from_wire(wired)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("X-Trace", "a\tb"),
        ("Content-Type", "text/plain; charset=utf-8"),
        ("x-u", "café"),
        ("A", ""),
    ],
)
def test_ordinary_headers_are_accepted(name: str, value: str) -> None:
    assert header_problem(name, value) is None


def walked_too_deep(value: object, limit: int) -> bool:
    """The reference: walk the parsed ``value`` (a container) level by level."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))  # type: ignore[attr-defined]
    return False


@given(json_values, st.integers(min_value=0, max_value=6), st.booleans(), st.booleans())
def test_depth_read_off_the_text_agrees_with_walking_the_value(
    value: object, limit: int, as_bytes: bool, ascii_only: bool
) -> None:
    """``text_too_deep`` (strings dropped, brackets peeled level by level) says what
    walking the parsed value says, for any JSON, brackets and escapes in strings
    included, as text or UTF-8 bytes."""
    text = json.dumps(value, ensure_ascii=ascii_only)
    nested = isinstance(value, dict | list) and walked_too_deep(value, limit)  # scalars: 0 deep
    assert wire.text_too_deep(text.encode() if as_bytes else text, limit) == nested


@pytest.mark.parametrize("inside", ['"[[["', '"\\"[[["', '"\\\\"', '"{\\u005b"'])
def test_brackets_in_strings_do_not_count_as_nesting(inside: str) -> None:
    text = "[" * MAX_JSON_DEPTH + inside + "]" * MAX_JSON_DEPTH
    assert json.loads(text)  # valid JSON
    assert not wire.text_too_deep(text)
    assert wire.text_too_deep("[" + text + "]")


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_exponent_growth_is_what_numeric_keeps_of_a_float(number: float) -> None:
    """PostgreSQL keeps a JSON number as ``numeric``, written out in positional notation
    (what ``Decimal``'s ``f`` format writes): ``exponent_growth`` is the difference, read
    off the text (a negative zero is kept as ``0``, one byte shorter)."""
    text = wire.dumps([number, "1e300 in a string is text"])
    kept = format(Decimal(repr(number)), "f").removeprefix("-" if number == 0 else "")
    assert wire.exponent_growth(text) == max(len(kept) - len(repr(number)), 0)
    assert wire.exponent_growth(text.encode()) == wire.exponent_growth(text)


def test_exponent_growth_of_literals_as_a_client_writes_them() -> None:
    assert wire.exponent_growth(b"1E3") == 1  # 1000
    assert wire.exponent_growth(b'{"a": 1.0000000000000001e300}') == 301 - 22
    assert wire.exponent_growth(b"[1.5e-5, -2e+2]") == (8 - 6) + (4 - 5)
    assert wire.exponent_growth(b'["1e300", {"1e300": 1}]') == 0
