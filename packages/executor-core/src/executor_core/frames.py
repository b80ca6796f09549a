"""Length-prefixed JSON frames, the only language host and worker speak.

A frame is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON
holding one object. JSON (never pickle or marshal) because what a worker sends is
untrusted: decoding it must not be able to run code, and NaN/Infinity are refused.

Host → worker: ``exec``, ``ret``, ``err``. Worker → host: ``ready``, ``call``,
``log``, ``done``. The host validates every worker frame (``host_bridge``).
Frames that expect an answer carry hints for busy-polling (see
``script_api.Channel``): the sender's ``perf_counter`` at sending (``ts``), and
either the worker's polling window (``s``, µs, from the host) or whether the
worker polls for the answer (``sp``).

Integers: JSON has no bound on their length, Python converts at most
:data:`MAX_INT_DIGITS` digits to or from text by default (``sys.int_info``), and
the cost of a conversion grows with the square of its length. Neither side of a
frame depends on that process-wide setting, which a script can change
(``sys.set_int_max_str_digits(0)``): :func:`decode` never converts a longer integer
but makes it a :class:`LongInt` (no ``int``, no JSON: every check of the host
refuses it as the sender's error), and :func:`dumps` refuses to write one.

Standard library only: the worker bootstrap imports this module.
"""

from __future__ import annotations

import _json
import os
import struct
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any

HEADER = struct.Struct(">I")
# No worker frame is legitimately larger: the biggest payloads are a document
# (1 MiB) or a response body (1 MiB, up to 4/3 of that as base64) plus JSON escaping.
MAX_FRAME_BYTES = 8 * 1024 * 1024


# Python's default limit (sys.int_info.default_max_str_digits), fixed here.
MAX_INT_DIGITS = 4300
_LONG_INT_MESSAGE = f"an integer of more than {MAX_INT_DIGITS} digits is not JSON picloud carries"
# Bound now, before any script runs: a script may replace ``sys``'s attributes.
_int_max_str_digits = sys.get_int_max_str_digits
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")


class FrameError(ValueError):
    """A frame could not be decoded or broke the size limit."""


class LongInt:
    """What :func:`decode` makes of an integer of more than :data:`MAX_INT_DIGITS`
    digits, instead of converting it: not an ``int`` and not JSON, so every argument
    check refuses it as invalid input (the frame itself is fine)."""

    __slots__ = ("digits",)

    def __init__(self, digits: int) -> None:
        self.digits = digits

    def __repr__(self) -> str:
        return f"<integer of {self.digits} digits>"


def _parse_int(text: str) -> int | LongInt:
    # The scanner hands over ``-?(0|[1-9][0-9]*)``: only a sign is not a digit.
    digits = len(text) - (text[0] == "-")
    if digits <= MAX_INT_DIGITS:
        try:
            return int(text)
        except ValueError:  # the process's limit is lower (a script's, or -X's)
            pass
    return LongInt(digits)


def _refuse_constant(name: str) -> Any:
    raise FrameError(f"{name} is not JSON")


def _not_json(value: object) -> Any:
    if isinstance(value, LongInt):
        raise TypeError(_LONG_INT_MESSAGE)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


class _ScanContext:
    """The settings ``_json.make_scanner`` reads (what ``json.JSONDecoder`` holds).

    The C scanner and encoder are used directly so the worker bootstrap does not
    import the ``json`` package (and ``re`` with it): a faster cold start.
    """

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = staticmethod(_refuse_constant)
    memo: dict[str, str] = {}


class _LongIntScanContext(_ScanContext):
    parse_int = staticmethod(_parse_int)


# ``int`` converts in C; ``_parse_int`` costs a Python call per integer (twice the
# time of a frame of numbers), so it only runs where ``int`` would not refuse a
# longer integer (the process's limit is lifted) or just did.
_scan = _json.make_scanner(_ScanContext())
_scan_long_ints = _json.make_scanner(_LongIntScanContext())


def dumps(value: Any) -> str:
    """Compact JSON text; ``TypeError``/``ValueError`` on non-JSON (NaN included, and
    an integer of more than :data:`MAX_INT_DIGITS` digits)."""
    encoder = _json.make_encoder(
        {}, _not_json, _json.encode_basestring, None, ":", ",", False, False, False
    )
    try:
        text = "".join(encoder(value, 0))
    except ValueError as exc:
        if _int_max_str_digits() == MAX_INT_DIGITS and str(exc).startswith("Exceeds the limit"):
            raise ValueError(_LONG_INT_MESSAGE) from None  # not "lift the limit"
        raise
    # Within the default limit the encoder itself refuses a longer int (ValueError);
    # past it (a script lifted it), such an int leaves a run of digits in the text.
    if len(text) > MAX_INT_DIGITS and not 0 < _int_max_str_digits() <= MAX_INT_DIGITS:
        raw = text.encode("utf-8", "surrogatepass").translate(_DIGITS_AS_ZERO)
        if b"0" * (MAX_INT_DIGITS + 1) in raw and _holds_long_int(value):
            raise ValueError(_LONG_INT_MESSAGE)
    return text


def _holds_long_int(value: Any) -> bool:
    """Whether an int of ``value`` (JSON-encodable) has more than MAX_INT_DIGITS digits
    (a run of digits in the text may be a string's)."""
    bound = 10**MAX_INT_DIGITS
    todo = [value]
    while todo:
        item = todo.pop()
        if isinstance(item, int):  # bool too: no harm
            if int.__abs__(item) >= bound:  # int's own: a subclass may override abs()
                return True
        # What the encoder reads, not what a subclass's methods would say.
        elif isinstance(item, dict):
            todo.extend(dict.keys(item))  # an int key is written as a string of it
            todo.extend(dict.values(item))
        elif isinstance(item, list):
            todo.extend(list.__iter__(item))
        elif isinstance(item, tuple):
            todo.extend(tuple.__iter__(item))
    return False


def encode(message: dict[str, Any]) -> bytes:
    """One frame, header included. Raises ``ValueError``/``TypeError`` on non-JSON."""
    body = dumps(message).encode("utf-8")
    return HEADER.pack(len(body)) + body


def decode(body: bytes | bytearray | memoryview) -> dict[str, Any]:
    """Parse one frame body into an object; raises :class:`FrameError` otherwise."""
    try:
        text = bytes(body).decode("utf-8")
        if 0 < _int_max_str_digits() <= MAX_INT_DIGITS:
            try:
                value, end = _scan(text, 0)
            except ValueError:  # an integer past the limit, or no JSON (fails again)
                value, end = _scan_long_ints(text, 0)
        else:
            value, end = _scan_long_ints(text, 0)
    except StopIteration:
        raise FrameError("undecodable frame") from None
    except (ValueError, RecursionError, SystemError) as exc:
        # SystemError: the C scanner reports errors through json.decoder, which the
        # worker does not import (the host does).
        raise FrameError(f"undecodable frame: {type(exc).__name__}") from None
    if end != len(text):
        raise FrameError("trailing data after the frame's JSON")
    if not isinstance(value, dict):
        raise FrameError("a frame must be a JSON object")
    return value


class FrameReader:
    """Incremental decoder for the host side: feed bytes, take whole frames."""

    def __init__(self, max_frame: int = MAX_FRAME_BYTES) -> None:
        self._buf = bytearray()
        self._max = max_frame

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """The frames ``data`` completes, decoded."""
        return [decode(body) for body in self.bodies(data)]

    def bodies(self, data: bytes) -> list[bytes]:
        """The frames ``data`` completes, still encoded (decode them with :func:`decode`
        when they are taken: a frame waiting costs its bytes, not its objects)."""
        self._buf += data
        frames: list[bytes] = []
        buf = self._buf
        pos = 0
        while len(buf) - pos >= HEADER.size:
            (size,) = HEADER.unpack_from(buf, pos)
            if size > self._max:
                raise FrameError(f"frame of {size} bytes is over the limit")
            end = pos + HEADER.size + size
            if len(buf) < end:
                break
            frames.append(bytes(buf[pos + HEADER.size : end]))
            pos = end
        if pos:
            del buf[:pos]
        return frames


def write_all(fd: int, data: bytes) -> None:
    """Blocking write of a whole buffer (worker side)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def read_exact(fd: int, size: int) -> bytes | None:
    """Blocking read of exactly ``size`` bytes; ``None`` on end of file (worker side)."""
    chunks: list[bytes] = []
    while size:
        chunk = os.read(fd, size)
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def read_frame(fd: int) -> dict[str, Any] | None:
    """Blocking read of one frame; ``None`` on end of file (worker side)."""
    header = read_exact(fd, HEADER.size)
    if header is None:
        return None
    (size,) = HEADER.unpack(header)
    body = read_exact(fd, size) if size else b""
    if body is None:
        return None
    return decode(body)
