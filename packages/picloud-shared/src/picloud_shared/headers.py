"""What a response header a script sets may hold (RFC 9110): a name of token
characters, a value without control characters but tab. Anything else would let a
script split the response (CR/LF) or make the HTTP server drop the connection.

Imported by the worker bootstrap too: no imports of its own.
"""

from __future__ import annotations

TOKEN_CHARS = frozenset(
    "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)
_CONTROL = {c: None for c in (*range(0, 9), *range(10, 32), 127)}


def header_problem(name: str, value: str) -> str | None:
    """Why ``name: value`` cannot be a response header, or ``None`` if it can."""
    if not name or not TOKEN_CHARS.issuperset(name):
        return f"header name {name[:40]!r} is not an HTTP token"
    if len(value.translate(_CONTROL)) != len(value):
        return f"header {name[:40]!r} holds a control character"
    return None
