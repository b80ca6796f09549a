"""What a script's HTTP response may be (RFC 9110), so that the server can always
send it: a final status (200-599: a 1xx is not an answer, and a 101 would switch
protocols), and headers whose name is a token and whose value has no control
character but tab (CR/LF would split the response; others make the HTTP server
drop the connection), at most ``MAX_HEADERS`` of them in ``MAX_HEADER_BYTES``. A 204,
205 or 304 carries no content, whatever the script put in its body.

Imported by the worker bootstrap too: no imports of its own.
"""

from __future__ import annotations

TOKEN_CHARS = frozenset(
    "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)
_CONTROL = {c: None for c in (*range(0, 9), *range(10, 32), 127)}
MIN_STATUS, MAX_STATUS = 200, 599
NO_CONTENT_STATUSES = frozenset({204, 205, 304})
MAX_HEADERS = 100
MAX_HEADER_BYTES = 32 * 1024  # names and values together, UTF-8


def status_problem(status: object) -> str | None:
    """Why ``status`` cannot be a response's status, or ``None`` if it can."""
    if isinstance(status, bool) or not isinstance(status, int):
        return "status must be an int"
    if not MIN_STATUS <= status <= MAX_STATUS:
        return f"status must be between {MIN_STATUS} and {MAX_STATUS}, not {status}"
    return None


def header_problem(name: str, value: str) -> str | None:
    """Why ``name: value`` cannot be a response header, or ``None`` if it can."""
    if not name or not TOKEN_CHARS.issuperset(name):
        return f"header name {name[:40]!r} is not an HTTP token"
    if len(value.translate(_CONTROL)) != len(value):
        return f"header {name[:40]!r} holds a control character"
    try:  # header bytes are ISO-8859-1: past U+00FF a character would go out altered
        value.encode("latin-1")
    except UnicodeEncodeError:
        return f"header {name[:40]!r} holds a character HTTP cannot send (not Latin-1)"
    return None


def headers_problem(headers: list[tuple[str, str]]) -> str | None:
    """Why ``headers`` (each already fine) are too many or too big, or ``None``."""
    if len(headers) > MAX_HEADERS:
        return f"a response has at most {MAX_HEADERS} headers, not {len(headers)}"
    size = sum(
        len(n.encode("utf-8", "replace")) + len(v.encode("utf-8", "replace")) for n, v in headers
    )
    if size > MAX_HEADER_BYTES:
        return f"a response's headers hold at most {MAX_HEADER_BYTES} bytes, not {size}"
    return None
