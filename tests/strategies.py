"""Every Hypothesis strategy of the suite, in one place."""

from __future__ import annotations

from hypothesis import strategies as st

from picloud_shared.events import DeadLetterEvent, DocsEvent, HttpEvent, KvEvent
from picloud_shared.execution import ExecError, ExecResult, ScriptResponse
from picloud_shared.ids import DeadLetterId, ExecutionId
from picloud_shared.inbox import InboxResult
from picloud_shared.outbox import HttpDispatchPayload, OutboxSourceKind
from picloud_shared.responses import TOKEN_CHARS
from picloud_shared.retry import Backoff, RetryPolicy
from picloud_shared.status import ExecErrorKind, InboxFailureKind
from picloud_shared.triggers import DocsOp, KvOp

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=5)
header_names = st.text(st.sampled_from(sorted(TOKEN_CHARS)), min_size=1, max_size=10)
# What HTTP carries in a header value unaltered: Latin-1 without control characters.
header_values = st.text(
    st.characters(max_codepoint=0xFF, blacklist_categories=["Cc"]) | st.just("\t"), max_size=10
)
str_maps = st.dictionaries(st.text(max_size=8), st.text(max_size=12), max_size=4)
uuids = st.uuids()


@st.composite
def retry_policies(draw: st.DrawFn) -> RetryPolicy:
    base = draw(st.integers(min_value=0, max_value=10**7))
    cap = draw(st.integers(min_value=base, max_value=7 * 24 * 3600 * 1000))
    return RetryPolicy(
        backoff=draw(st.sampled_from(Backoff)),
        base_delay_ms=base,
        max_delay_ms=cap,
        max_attempts=draw(st.integers(min_value=1, max_value=100)),
        jitter=draw(st.floats(min_value=0.0, max_value=1.0)),
    )


kv_events = st.builds(
    KvEvent,
    key=st.text(min_size=1, max_size=30),
    op=st.sampled_from(KvOp),
    value=json_values,
    prev_value=json_values,
)
docs_events = st.builds(
    DocsEvent,
    collection=st.text(min_size=1, max_size=20),
    id=st.text(min_size=1, max_size=20),
    op=st.sampled_from(DocsOp),
    data=st.none() | json_objects,
    prev_data=st.none() | json_objects,
)
dead_letter_events = st.builds(
    DeadLetterEvent,
    dead_letter_id=uuids.map(DeadLetterId),
    source_kind=st.sampled_from(OutboxSourceKind),
    event=json_objects,
    error=json_objects,
    attempts=st.integers(min_value=0, max_value=100),
)
http_events = st.builds(
    HttpEvent,
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
    path=st.text(max_size=30),
    params=str_maps,
    query=str_maps,
    headers=str_maps,
    body=st.text(max_size=50),
    json=json_values,
)
trigger_events = kv_events | docs_events | dead_letter_events | http_events

script_responses = st.builds(
    ScriptResponse,
    status=st.integers(min_value=200, max_value=599),
    headers=st.lists(st.tuples(header_names, header_values), max_size=3).map(tuple),
    body=st.binary(max_size=64),
)
exec_errors = st.builds(
    ExecError,
    kind=st.sampled_from(ExecErrorKind),
    message=st.text(max_size=40),
    traceback=st.none() | st.text(max_size=40),
)
execution_ids = uuids.map(ExecutionId)
exec_results = st.one_of(
    st.builds(
        ExecResult.succeeded,
        execution_ids,
        script_responses,
        st.lists(st.text(max_size=10), max_size=3).map(tuple),
        st.floats(min_value=0, max_value=1e6),
    ),
    st.builds(
        ExecResult.failed,
        execution_ids,
        exec_errors,
        st.lists(st.text(max_size=10), max_size=3).map(tuple),
        st.floats(min_value=0, max_value=1e6),
    ),
)
inbox_results = st.one_of(
    st.builds(InboxResult, execution_ids, response=script_responses),
    st.builds(
        InboxResult.failed, execution_ids, st.sampled_from(InboxFailureKind), st.text(max_size=30)
    ),
)
http_payloads = st.builds(
    HttpDispatchPayload, route_id=uuids, event=http_events.map(lambda e: e.to_wire())
)
