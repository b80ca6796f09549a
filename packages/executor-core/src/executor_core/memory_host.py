"""An in-memory :class:`~picloud_shared.ports.HostApi` for one app.

The executor's own tests run scripts against it; other packages may use it as a
fake where the store is not the point. It checks the same limits and raises the
same errors as the real one (``executor_core.validation``), deep-copies every
value in and out, and, when given a principal, enforces ``app_read_data`` and
``app_write_data``. One object holds one app's data; it may serve many
executions.
"""

from __future__ import annotations

import copy
import uuid
from typing import Any

from executor_core import validation
from picloud_shared.errors import Conflict, Forbidden, NotFound
from picloud_shared.principals import Capability, Principal


class MemoryHostApi:
    """One app's KV entries and documents, in dicts."""

    def __init__(self, principal: Principal | None = None) -> None:
        self.principal = principal
        self.kv: dict[str, Any] = {}
        self.docs: dict[str, dict[str, dict[str, Any]]] = {}
        self.logs: list[str] = []
        self.calls = 0

    def _need(self, capability: Capability) -> None:
        self.calls += 1
        if self.principal is not None and not self.principal.can(capability):
            raise Forbidden(f"the principal lacks {capability.value}")

    async def kv_get(self, key: str) -> Any:
        self._need(Capability.APP_READ_DATA)
        return copy.deepcopy(self.kv.get(validation.key(key)))

    async def kv_set(self, key: str, value: Any) -> None:
        self._need(Capability.APP_WRITE_DATA)
        self.kv[validation.key(key)] = copy.deepcopy(validation.json_value(value))

    async def kv_delete(self, key: str) -> bool:
        self._need(Capability.APP_WRITE_DATA)
        return self.kv.pop(validation.key(key), _MISSING) is not _MISSING

    async def kv_list(
        self, prefix: str = "", limit: int = 100, after: str | None = None
    ) -> list[dict[str, Any]]:
        self._need(Capability.APP_READ_DATA)
        prefix, limit = validation.prefix(prefix), validation.limit(limit)
        after = validation.after_key(after)
        # Code point order is UTF-8's byte order, PostgreSQL's under the C collation.
        found = (k for k in self.kv if k.startswith(prefix) and (after is None or k > after))
        keys = sorted(found)[:limit]
        return [{"key": k, "value": copy.deepcopy(self.kv[k])} for k in keys]

    async def docs_insert(
        self, collection: str, data: dict[str, Any], id: str | None = None
    ) -> str:
        self._need(Capability.APP_WRITE_DATA)
        coll = self.docs.setdefault(validation.collection(collection), {})
        data = validation.document(data)
        doc_id = uuid.uuid4().hex if id is None else validation.doc_id(id)
        if doc_id in coll:
            raise Conflict(f"document {doc_id!r} already exists")
        coll[doc_id] = copy.deepcopy(data)
        return doc_id

    async def docs_get(self, collection: str, id: str) -> dict[str, Any] | None:
        self._need(Capability.APP_READ_DATA)
        coll = self.docs.get(validation.collection(collection), {})
        return copy.deepcopy(coll.get(validation.doc_id(id)))

    async def docs_update(self, collection: str, id: str, data: dict[str, Any]) -> None:
        self._need(Capability.APP_WRITE_DATA)
        coll = self.docs.get(validation.collection(collection), {})
        doc_id, data = validation.doc_id(id), validation.document(data)
        if doc_id not in coll:
            raise NotFound(f"no document {doc_id!r} in {collection!r}")
        coll[doc_id] = copy.deepcopy(data)

    async def docs_delete(self, collection: str, id: str) -> bool:
        self._need(Capability.APP_WRITE_DATA)
        coll = self.docs.get(validation.collection(collection), {})
        return coll.pop(validation.doc_id(id), _MISSING) is not _MISSING

    async def docs_query(
        self,
        collection: str,
        where: dict[str, Any] | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[dict[str, Any]]:
        self._need(Capability.APP_READ_DATA)
        coll = self.docs.get(validation.collection(collection), {})
        where, limit = validation.where(where) or {}, validation.limit(limit)
        after = validation.after_doc_id(after)
        out = []
        for doc_id in sorted(i for i in coll if after is None or i > after):
            data = coll[doc_id]
            if all(k in data and data[k] == v for k, v in where.items()):
                out.append({"id": doc_id, "data": copy.deepcopy(data)})
                if len(out) == limit:
                    break
        return out

    async def log(self, line: str) -> None:
        self.logs.append(line)


_MISSING = object()
