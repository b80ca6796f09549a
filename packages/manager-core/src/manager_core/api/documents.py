"""An app's document store through the admin API. Writes fire docs triggers
exactly as script writes do (at ``trigger_depth`` 1, as KV writes: :mod:`.kv`).

POST inserts with a generated id; PUT replaces a document, creating it under
that id when it does not exist yet (201 then, 200 on replace).

A document id is any text ``ctx.docs`` accepts, ``/`` included: the id is the
rest of the path after the collection, sent as is (``…/docs/c/a/b``) or encoded
(``…/docs/c/a%2Fb``), both the id ``a/b``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.responses import Response

from manager_core.api._endpoint import Call, Operation, Resource
from manager_core.api._http import json_response, no_content, read_json
from manager_core.api._pagination import PageRequest
from manager_core.api.kv import ADMIN_WRITE_DEPTH
from picloud_shared.domain import check_collection
from picloud_shared.errors import Conflict, InvalidInput, NotFound
from picloud_shared.principals import Capability
from picloud_shared.wire import JsonObject

if TYPE_CHECKING:
    from manager_core.api.deps import AdminDeps


def _collection(call: Call) -> str:
    return check_collection(call.path("collection"))


async def _data(call: Call) -> JsonObject:
    body = await read_json(call.request)
    if not isinstance(body, dict):
        raise InvalidInput("a document must be a JSON object")
    return body


async def insert_document(call: Call) -> Response:
    """The body is the document → 201 ``{"id", "data"}``."""
    collection = _collection(call)
    doc = await call.deps.documents.insert(
        call.app_id, collection, await _data(call), trigger_depth=ADMIN_WRITE_DEPTH
    )
    return json_response(doc.to_wire(), 201)


async def put_document(call: Call) -> Response:
    """Replace (200) or create under this id (201) → ``{"id", "data"}``."""
    collection, doc_id = _collection(call), call.path("doc_id")
    data = await _data(call)
    docs = call.deps.documents
    for _ in range(2):  # an insert racing ours turns into a replace
        try:
            doc = await docs.update(
                call.app_id, collection, doc_id, data, trigger_depth=ADMIN_WRITE_DEPTH
            )
            return json_response(doc.to_wire())
        except NotFound:
            try:
                doc = await docs.insert(
                    call.app_id, collection, data, doc_id, trigger_depth=ADMIN_WRITE_DEPTH
                )
                return json_response(doc.to_wire(), 201)
            except Conflict:
                continue
    raise Conflict("the document changed concurrently; try again")


async def get_document(call: Call) -> Response:
    """``{"id", "data"}`` or 404."""
    collection, doc_id = _collection(call), call.path("doc_id")
    doc = await call.deps.documents.get(call.app_id, collection, doc_id)
    if doc is None:
        raise NotFound(f"no document {doc_id!r} in {collection!r}")
    return json_response(doc.to_wire())


async def delete_document(call: Call) -> Response:
    """204, or 404 when the document does not exist."""
    collection, doc_id = _collection(call), call.path("doc_id")
    deleted = await call.deps.documents.delete(
        call.app_id, collection, doc_id, trigger_depth=ADMIN_WRITE_DEPTH
    )
    if not deleted:
        raise NotFound(f"no document {doc_id!r} in {collection!r}")
    return no_content()


async def list_documents(call: Call) -> Response:
    """A collection's documents in id order."""
    collection = _collection(call)
    page = PageRequest.from_request(call.request)
    rows = await call.deps.documents.list(
        call.app_id, collection, page.fetch, None if page.after is None else page.after[0]
    )
    return page.respond(rows, lambda d: (d.id,), lambda d: d.to_wire())


def resources(deps: AdminDeps) -> list[Resource]:
    """The document endpoints."""
    write, read = Capability.APP_WRITE_DATA, Capability.APP_READ_DATA
    return [
        Resource(
            "/apps/{id}/docs/{collection}",
            deps,
            {"POST": Operation(write, insert_document), "GET": Operation(read, list_documents)},
        ),
        Resource(
            "/apps/{id}/docs/{collection}/{doc_id:path}",
            deps,
            {
                "PUT": Operation(write, put_document),
                "GET": Operation(read, get_document),
                "DELETE": Operation(write, delete_document),
            },
        ),
    ]
