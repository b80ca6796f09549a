"""An app's triggers: KV, docs and dead-letter (Layout E), list, change and delete.

Each create endpoint decodes its body into a ``Create*TriggerRequest`` (the
script by name, globs, ops, retry policy) and registers the trigger as the
calling user: scripts run as the principal that registered their trigger.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

import attrs
from starlette.responses import Response

from manager_core.api._endpoint import Call, Operation, Resource
from manager_core.api._http import Fields, json_response, no_content, path_uuid
from manager_core.api._pagination import PageRequest
from manager_core.postgres.triggers import TriggerChanges
from picloud_shared import wire
from picloud_shared.errors import InvalidInput, InvalidRetryPolicy, NotFound, UnknownScript
from picloud_shared.ids import AppId, ScriptId, TriggerId
from picloud_shared.outbox import OutboxSourceKind
from picloud_shared.principals import Capability
from picloud_shared.retry import DEFAULT_RETRY_POLICY, RetryPolicy
from picloud_shared.triggers import (
    CreateDeadLetterTrigger,
    CreateDocsTrigger,
    CreateKvTrigger,
    DeadLetterTriggerDetails,
    DocsOp,
    DocsTriggerDetails,
    KvOp,
    KvTriggerDetails,
    Trigger,
    TriggerKind,
    check_glob,
    parse_ops,
)
from picloud_shared.wire import JsonObject

if TYPE_CHECKING:
    from manager_core.api.deps import AdminDeps


def _retry(fields: Fields) -> RetryPolicy:
    raw = fields.obj("retry", None)
    return DEFAULT_RETRY_POLICY if raw is None else RetryPolicy.from_wire(raw)


@attrs.frozen
class CreateKvTriggerRequest:
    """``{"script", "key_glob", "ops"?: [], "retry"?}``"""

    script: str
    key_glob: str
    ops: tuple[KvOp, ...]
    retry: RetryPolicy

    @classmethod
    def from_fields(cls, fields: Fields) -> CreateKvTriggerRequest:
        return cls(
            script=fields.text("script"),
            key_glob=check_glob(fields.text("key_glob")),
            ops=parse_ops(KvOp, fields.text_list("ops", [])),
            retry=_retry(fields),
        )


@attrs.frozen
class CreateDocsTriggerRequest:
    """``{"script", "collection_glob", "ops"?: [], "retry"?}``"""

    script: str
    collection_glob: str
    ops: tuple[DocsOp, ...]
    retry: RetryPolicy

    @classmethod
    def from_fields(cls, fields: Fields) -> CreateDocsTriggerRequest:
        return cls(
            script=fields.text("script"),
            collection_glob=check_glob(fields.text("collection_glob")),
            ops=parse_ops(DocsOp, fields.text_list("ops", [])),
            retry=_retry(fields),
        )


# What a dead letter can come from: never a dead-letter handler's execution, which is
# never dead-lettered (DESIGN.md), so ``dead_letter`` would match nothing.
DEAD_LETTER_SOURCES = tuple(k for k in OutboxSourceKind if k is not OutboxSourceKind.DEAD_LETTER)


@attrs.frozen
class CreateDeadLetterTriggerRequest:
    """``{"script", "source_kinds"?: []}``: no ``retry``, as a dead-letter handler is
    never retried (a policy given is 422, not silently unused)."""

    script: str
    source_kinds: tuple[OutboxSourceKind, ...]
    retry: RetryPolicy = DEFAULT_RETRY_POLICY

    @classmethod
    def from_fields(cls, fields: Fields) -> CreateDeadLetterTriggerRequest:
        _refuse_retry(fields)
        return cls(
            script=fields.text("script"),
            source_kinds=_source_kinds(fields.text_list("source_kinds", [])),
        )


def _refuse_retry(fields: Fields) -> None:
    """A dead-letter trigger's 422 for a ``retry`` given."""
    if fields.obj("retry", None) is not None:
        raise InvalidRetryPolicy(
            "a dead-letter trigger takes no retry policy: its script runs once per "
            "dead letter and is never retried"
        )


def _source_kinds(names: list[str]) -> tuple[OutboxSourceKind, ...]:
    """A dead-letter trigger's ``source_kinds`` (deduplicated, sorted)."""
    kinds: set[OutboxSourceKind] = set()
    for name in names:
        try:
            kind = OutboxSourceKind(name)
        except ValueError:
            kind = None
        if kind not in DEAD_LETTER_SOURCES:
            allowed = ", ".join(k.value for k in DEAD_LETTER_SOURCES)
            raise InvalidInput(
                f"unknown source kind {name!r}; expected one of: {allowed}"
                " (a dead-letter handler's execution is never dead-lettered)"
            )
        assert kind is not None
        kinds.add(kind)
    return tuple(sorted(kinds))


def trigger_to_wire(trigger: Trigger, script_name: str) -> JsonObject:
    """A trigger as the API answers it, with its script's name (as routes have)."""
    body: JsonObject = {
        "id": str(trigger.id),
        "kind": trigger.kind.value,
        "script": script_name,
        "script_id": str(trigger.script_id),
        "registered_by": (
            None
            if trigger.registered_by_principal is None
            else str(trigger.registered_by_principal)
        ),
        # A dead-letter handler is never retried: it has no policy to show.
        "retry": None if trigger.kind is TriggerKind.DEAD_LETTER else trigger.retry.to_wire(),
        "created_at": wire.timestamp_text(trigger.created_at),
    }
    details = trigger.details
    if isinstance(details, KvTriggerDetails):
        body["key_glob"] = details.key_glob
        body["ops"] = [o.value for o in details.ops]
    elif isinstance(details, DocsTriggerDetails):
        body["collection_glob"] = details.collection_glob
        body["ops"] = [o.value for o in details.ops]
    elif isinstance(details, DeadLetterTriggerDetails):
        body["source_kinds"] = [k.value for k in details.source_kinds]
    return body


async def _script_id(call: Call, name: str) -> ScriptId:
    script = await call.deps.scripts.get(call.app_id, name)
    if script is None:
        raise UnknownScript(f"no script named {name!r} in this app")
    return script.id


async def create_kv_trigger(call: Call) -> Response:
    """201 ``{"id", "kind": "kv", …}``."""
    req = CreateKvTriggerRequest.from_fields(await call.fields())
    trigger = await call.deps.triggers.create_kv_trigger(
        CreateKvTrigger(
            app_id=call.app_id,
            script_id=await _script_id(call, req.script),
            registered_by_principal=call.user.id,
            key_glob=req.key_glob,
            ops=req.ops,
            retry=req.retry,
        )
    )
    return json_response(trigger_to_wire(trigger, req.script), 201)


async def create_docs_trigger(call: Call) -> Response:
    """201 ``{"id", "kind": "docs", …}``."""
    req = CreateDocsTriggerRequest.from_fields(await call.fields())
    trigger = await call.deps.triggers.create_docs_trigger(
        CreateDocsTrigger(
            app_id=call.app_id,
            script_id=await _script_id(call, req.script),
            registered_by_principal=call.user.id,
            collection_glob=req.collection_glob,
            ops=req.ops,
            retry=req.retry,
        )
    )
    return json_response(trigger_to_wire(trigger, req.script), 201)


async def create_dead_letter_trigger(call: Call) -> Response:
    """201 ``{"id", "kind": "dead_letter", …}``."""
    req = CreateDeadLetterTriggerRequest.from_fields(await call.fields())
    trigger = await call.deps.triggers.create_dead_letter_trigger(
        CreateDeadLetterTrigger(
            app_id=call.app_id,
            script_id=await _script_id(call, req.script),
            registered_by_principal=call.user.id,
            source_kinds=req.source_kinds,
            retry=req.retry,
        )
    )
    return json_response(trigger_to_wire(trigger, req.script), 201)


# The fields a PATCH takes for each kind, besides ``script``. One of another kind's is
# 422, not ignored: a PATCH's path does not name the kind, so it is easily mistaken.
_GLOB_FIELD = {TriggerKind.KV: "key_glob", TriggerKind.DOCS: "collection_glob"}
_KIND_FIELDS = {
    TriggerKind.KV: {"key_glob", "ops", "retry"},
    TriggerKind.DOCS: {"collection_glob", "ops", "retry"},
    TriggerKind.DEAD_LETTER: {"source_kinds"},
}
_ALL_KIND_FIELDS = set().union(*_KIND_FIELDS.values())


def _changes(fields: Fields, kind: TriggerKind) -> TriggerChanges:
    """A PATCH body's changes to a trigger of ``kind``, checked as its create checks
    them (``invalid_glob``, ``unknown_op``, ``invalid_retry_policy``, …)."""
    if kind is TriggerKind.DEAD_LETTER:
        _refuse_retry(fields)  # before the rest, as create does: its own code
    given = fields.text("kind", None)
    if given is not None and given.replace("-", "_") != kind.value:
        raise InvalidInput("field 'kind': a trigger's kind cannot change; create another trigger")
    for name in sorted(_ALL_KIND_FIELDS - _KIND_FIELDS[kind]):
        if name in fields:
            raise InvalidInput(f"field {name!r}: a {kind.value} trigger has no {name}")
    if kind is TriggerKind.DEAD_LETTER:
        names = fields.text_list("source_kinds", None)
        return TriggerChanges(source_kinds=None if names is None else _source_kinds(names))
    glob = fields.text(_GLOB_FIELD[kind], None)
    ops = fields.text_list("ops", None)
    return TriggerChanges(
        retry=None if "retry" not in fields else RetryPolicy.from_wire(fields.obj("retry")),
        glob=None if glob is None else check_glob(glob),
        ops=None if ops is None else parse_ops(KvOp if kind is TriggerKind.KV else DocsOp, ops),
    )


async def patch_trigger(call: Call) -> Response:
    """Any of ``{"script", "retry"}`` and the kind's own fields (``key_glob``/``ops``,
    ``collection_glob``/``ops``, ``source_kinds``) → 200 the trigger, now registered
    by the caller. Events already fired keep what they were fired with."""
    trigger_id = TriggerId(path_uuid(call.request, "trigger_id", "trigger"))
    fields = await call.fields()
    script = fields.text("script", None)
    current = await call.deps.triggers.get(call.app_id, trigger_id)
    if current is None:
        raise NotFound("no such trigger")
    changes = _changes(fields, current.kind)
    if script is not None:
        changes = attrs.evolve(changes, script_id=await _script_id(call, script))
    named = await call.deps.triggers.update(
        call.app_id, trigger_id, changes, registered_by_principal=call.user.id
    )
    if named is None:
        raise NotFound("no such trigger")
    return json_response(trigger_to_wire(*named))


def uuid_cursor(value: str) -> uuid.UUID:
    """A cursor key that must be a UUID; ``InvalidInput`` otherwise."""
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidInput("malformed cursor") from None


async def list_triggers(call: Call) -> Response:
    """The app's triggers, in id order."""
    page = PageRequest.from_request(call.request)
    after = None if page.after is None else TriggerId(uuid_cursor(page.after[0]))
    rows = await call.deps.triggers.list_named(AppId(call.app_id), page.fetch, after)
    return page.respond(rows, lambda row: (str(row[0].id),), lambda row: trigger_to_wire(*row))


async def get_trigger(call: Call) -> Response:
    """One trigger, as listed."""
    trigger_id = TriggerId(path_uuid(call.request, "trigger_id", "trigger"))
    named = await call.deps.triggers.get_named(call.app_id, trigger_id)
    if named is None:
        raise NotFound("no such trigger")
    return json_response(trigger_to_wire(*named))


async def delete_trigger(call: Call) -> Response:
    """Delete one trigger; 204."""
    trigger_id = TriggerId(path_uuid(call.request, "trigger_id", "trigger"))
    if not await call.deps.triggers.delete(call.app_id, trigger_id):
        raise NotFound("no such trigger")
    return no_content()


def resources(deps: AdminDeps) -> list[Resource]:
    """The trigger endpoints."""
    manage = Capability.APP_MANAGE_TRIGGERS
    # A trigger's events carry the app's data (a value, a document, a dead row's
    # event) to a script that runs as the caller: the caller must be able to read it.
    reads = frozenset({Capability.APP_READ_DATA})
    return [
        Resource(
            "/apps/{id}/triggers/kv", deps, {"POST": Operation(manage, create_kv_trigger, reads)}
        ),
        Resource(
            "/apps/{id}/triggers/docs",
            deps,
            {"POST": Operation(manage, create_docs_trigger, reads)},
        ),
        Resource(
            "/apps/{id}/triggers/dead-letter",
            deps,
            {"POST": Operation(manage, create_dead_letter_trigger, reads)},
        ),
        Resource(
            "/apps/{id}/triggers", deps, {"GET": Operation(Capability.APP_READ, list_triggers)}
        ),
        Resource(
            "/apps/{id}/triggers/{trigger_id}",
            deps,
            {
                "GET": Operation(Capability.APP_READ, get_trigger),
                "PATCH": Operation(manage, patch_trigger, reads),
                "DELETE": Operation(manage, delete_trigger),
            },
        ),
    ]
