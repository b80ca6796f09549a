"""Serving a worker's host calls in the parent, trusting nothing it sends.

The worker names an operation and its arguments, nothing else: the app (and the
transaction, for the Postgres host) is fixed by the ``HostApi`` object the
executor was given for this execution. Every argument is validated here before
the host sees it, calls and the bytes they write are capped per execution, and a
``PicloudError`` from the host goes back as an ``err`` frame the script re-raises.
Any other exception from the host is not the script's doing and propagates to the
caller.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from executor_core import validation as v
from picloud_shared.errors import InvalidInput, LimitExceeded, PicloudError
from picloud_shared.limits import MAX_HOST_CALLS_PER_EXECUTION, MAX_WRITE_BYTES_PER_EXECUTION

if TYPE_CHECKING:
    from picloud_shared.ports import HostApi


def _opt_doc_id(value: object) -> str | None:
    return None if value is None else v.doc_id(value)


# op → (argument checks, HostApi method name, the argument that is written). Arity
# is exact. The check of the written argument returns it with its size as JSON.
_OPS: dict[str, tuple[tuple[Callable[[Any], Any], ...], str, int | None]] = {
    "kv_get": ((v.key,), "kv_get", None),
    "kv_set": ((v.key, v.sized_json_value), "kv_set", 1),
    "kv_delete": ((v.key,), "kv_delete", None),
    "kv_list": ((v.prefix, v.limit, v.after_key), "kv_list", None),
    "docs_insert": ((v.collection, v.sized_document, _opt_doc_id), "docs_insert", 1),
    "docs_get": ((v.collection, v.doc_id), "docs_get", None),
    "docs_update": ((v.collection, v.doc_id, v.sized_document), "docs_update", 2),
    "docs_delete": ((v.collection, v.doc_id), "docs_delete", None),
    "docs_query": ((v.collection, v.where, v.limit, v.after_doc_id), "docs_query", None),
}
OPS = frozenset(_OPS)


def _checked(op: str, args: object) -> list[Any]:
    """The arguments as the host takes them; raises the caller's ``PicloudError``."""
    checks = _OPS[op][0]
    if not isinstance(args, list) or len(args) != len(checks):
        raise InvalidInput(f"{op} takes {len(checks)} arguments")
    return [check(arg) for check, arg in zip(checks, args, strict=True)]


def argument_error(op: str, args: list[Any]) -> tuple[str, str] | None:
    """(code, message) of the error the host answers these arguments with, if any
    (for the worker, whose frame would be too big to ask)."""
    try:
        _checked(op, args)
    except PicloudError as exc:
        return exc.code, exc.message
    return None


class HostBridge:
    """One execution's host calls."""

    def __init__(
        self,
        host: HostApi,
        max_calls: int = MAX_HOST_CALLS_PER_EXECUTION,
        max_write_bytes: int = MAX_WRITE_BYTES_PER_EXECUTION,
    ) -> None:
        self._host = host
        self._max_calls = max_calls
        self._max_write_bytes = max_write_bytes
        self.calls = 0
        self.written = 0  # bytes of values and documents (as JSON) the calls wrote

    async def serve(self, call_id: int, op: str, args: object) -> dict[str, Any]:
        """The reply frame for one ``call`` (``op`` is already known to be in OPS)."""
        self.calls += 1
        try:
            if self.calls > self._max_calls:
                raise LimitExceeded(f"at most {self._max_calls} host calls per execution")
            _, method, written = _OPS[op]
            clean = _checked(op, args)
            size = 0
            if written is not None:
                clean[written], size = clean[written]
                if self.written + size > self._max_write_bytes:
                    raise LimitExceeded(
                        f"at most {self._max_write_bytes} bytes of values and documents "
                        "written per execution"
                    )
            fn: Callable[..., Awaitable[Any]] = getattr(self._host, method)
            value = await fn(*clean)
            self.written += size  # a write the host refused wrote nothing
        except PicloudError as exc:
            return {"t": "err", "id": call_id, "code": exc.code, "msg": exc.message}
        return {"t": "ret", "id": call_id, "v": value}
