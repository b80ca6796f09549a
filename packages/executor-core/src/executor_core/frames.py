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

Standard library only: the worker bootstrap imports this module.
"""

from __future__ import annotations

import _json
import os
import struct
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any

HEADER = struct.Struct(">I")
# No worker frame is legitimately larger: the biggest payloads are a document
# (1 MiB) or a response body (1 MiB, up to 4/3 of that as base64) plus JSON escaping.
MAX_FRAME_BYTES = 8 * 1024 * 1024


class FrameError(ValueError):
    """A frame could not be decoded or broke the size limit."""


def _refuse_constant(name: str) -> Any:
    raise FrameError(f"{name} is not JSON")


def _not_json(value: object) -> Any:
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


_scan = _json.make_scanner(_ScanContext())


def dumps(value: Any) -> str:
    """Compact JSON text; ``TypeError``/``ValueError`` on non-JSON (NaN included)."""
    encoder = _json.make_encoder(
        {}, _not_json, _json.encode_basestring, None, ":", ",", False, False, False
    )
    return "".join(encoder(value, 0))


def encode(message: dict[str, Any]) -> bytes:
    """One frame, header included. Raises ``ValueError``/``TypeError`` on non-JSON."""
    body = dumps(message).encode("utf-8")
    return HEADER.pack(len(body)) + body


def decode(body: bytes | bytearray | memoryview) -> dict[str, Any]:
    """Parse one frame body into an object; raises :class:`FrameError` otherwise."""
    try:
        text = bytes(body).decode("utf-8")
        value, end = _scan(text, 0)
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
