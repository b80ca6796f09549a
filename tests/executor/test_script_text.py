"""Text a script makes that is not valid Unicode, or not text at all: its own failure.

Diagnostic text (exception messages, tracebacks, reject messages, log lines) is made
safe: half a surrogate pair becomes U+FFFD, a ``__str__`` that fails an
``<unprintable E>``. Data crossing to the host (KV keys and values, documents,
response headers) is refused, never altered: a catchable ``invalid_input`` for a
host call, an ``invalid_return`` for a response. None of it costs the worker.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable

import pytest

from executor_core import validation
from executor_core.executor import ProcessExecutor
from executor_core.host_bridge import HostBridge
from executor_core.memory_host import MemoryHostApi
from picloud_shared.errors import InvalidInput
from picloud_shared.execution import ExecRequest, ExecResult, ScriptResponse
from picloud_shared.status import ExecErrorKind, InboxFailureKind
from picloud_shared.wire import WireError

MakeRequest = Callable[..., ExecRequest]
pytestmark = pytest.mark.anyio

PID = "import os\ndef handle(e, ctx):\n    return os.getpid()\n"


def src(body: str) -> str:
    return textwrap.dedent(body).strip() + "\n"


def pid(result: ExecResult) -> int:
    assert result.error is None, result.error
    assert result.response is not None
    return int(result.response.body)


async def run_keeping_the_worker(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest, source: str
) -> ExecResult:
    """Run ``source`` between two runs that report the worker's pid: the same pid
    after it shows the failure did not cost the worker."""
    before = pid(await executor.execute(make_request(PID), host))
    result = await executor.execute(make_request(source), host)
    assert pid(await executor.execute(make_request(PID), host)) == before
    return result


@pytest.mark.parametrize(
    ("exception", "message"),
    [
        ("raise", "E: <unprintable E>"),
        ("return 5", "E: <unprintable E>"),
        ("return None", "E: <unprintable E>"),
        ("raise SystemExit(3)", "E: <unprintable E>"),
    ],
)
async def test_an_exception_whose_str_fails_is_the_scripts_error(
    executor: ProcessExecutor,
    host: MemoryHostApi,
    make_request: MakeRequest,
    exception: str,
    message: str,
) -> None:
    """A ``__str__`` that raises or returns no str is an uncaught exception (502), with a
    stand-in message, not a dead worker (500)."""
    body = "raise RuntimeError('inner')" if exception == "raise" else exception
    source = src(f"""
    class E(Exception):
        def __str__(self):
            {body}
    def handle(e, ctx):
        raise E()
    """)
    result = await run_keeping_the_worker(executor, host, make_request, source)
    assert result.error is not None
    assert result.error.kind is ExecErrorKind.UNCAUGHT_EXCEPTION
    assert result.error.failure_kind is InboxFailureKind.SCRIPT_ERROR
    assert result.error.message == message
    assert "raise E()" in (result.error.traceback or "")


async def test_a_reject_whose_message_fails_to_print_is_still_a_rejection(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest
) -> None:
    """``raise ctx.Rejected(obj)`` with a failing ``__str__`` is 422 all the same."""
    source = src("""
    class M:
        def __str__(self):
            raise RuntimeError('inner')
    def handle(e, ctx):
        raise ctx.Rejected(M())
    """)
    result = await run_keeping_the_worker(executor, host, make_request, source)
    assert result.error is not None
    assert result.error.kind is ExecErrorKind.REJECTED
    assert result.error.message == "<unprintable Rejected>"


@pytest.mark.parametrize(
    ("statement", "kind", "message"),
    [
        ("raise ValueError('a\\ud800b')", ExecErrorKind.UNCAUGHT_EXCEPTION, "ValueError: a\ufffdb"),
        ("ctx.reject('a\\ud800b')", ExecErrorKind.REJECTED, "a\ufffdb"),
        (
            "exc = KeyError('k'); exc.add_note('n\\udc80'); raise exc",
            ExecErrorKind.UNCAUGHT_EXCEPTION,
            None,
        ),
    ],
)
async def test_half_a_surrogate_pair_in_an_error_becomes_a_replacement_character(
    executor: ProcessExecutor,
    host: MemoryHostApi,
    make_request: MakeRequest,
    statement: str,
    kind: ExecErrorKind,
    message: str | None,
) -> None:
    """A lone surrogate in a message (or a note of the traceback) is U+FFFD, and the
    failure keeps its kind (502, 422), not a dead worker."""
    source = f"def handle(e, ctx):\n    {statement}\n"
    result = await run_keeping_the_worker(executor, host, make_request, source)
    assert result.error is not None
    assert result.error.kind is kind
    if message is not None:
        assert result.error.message == message
    else:
        assert "n\ufffd" in (result.error.traceback or "")
    for text in (result.error.message, result.error.traceback or ""):
        text.encode("utf-8")


async def test_half_a_surrogate_pair_in_a_log_line_becomes_a_replacement_character(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest
) -> None:
    """``print`` and ``ctx.log`` lines are for reading: U+FFFD stands in, the line stays."""
    source = src("""
    def handle(e, ctx):
        print('p\\ud800')
        ctx.log('l', '\\udfff!')
        return 'ok'
    """)
    result = await run_keeping_the_worker(executor, host, make_request, source)
    assert result.error is None, result.error
    assert result.logs == ("p\ufffd", "l \ufffd!")


@pytest.mark.parametrize(
    "call",
    [
        "ctx.kv.set('\\ud800', 1)",
        "ctx.kv.set('k', '\\ud800')",
        "ctx.kv.set('k', {'\\udc00': 1})",
        "ctx.kv.get('\\ud800')",
        "ctx.kv.list('\\ud800')",
        "ctx.docs.insert('c', {'a': ['\\ud800']})",
        "ctx.docs.insert('c', {}, id='\\ud800')",
        "ctx.docs.query('c', where={'a': '\\ud800'})",
    ],
)
async def test_a_host_call_with_half_a_surrogate_pair_is_invalid_input(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest, call: str
) -> None:
    """Data is never altered: the call raises the script API's catchable
    ``invalid_input`` error, whose message holds nothing of the frame, and the
    script's other writes go on."""
    source = src(f"""
    def handle(e, ctx):
        try:
            {call}
        except ctx.Error as exc:
            caught = [type(exc).__name__, exc.code, exc.message]
        else:
            caught = None
        ctx.kv.set('after', 1)
        return caught
    """)
    result = await run_keeping_the_worker(executor, host, make_request, source)
    assert result.error is None, result.error
    assert result.response is not None
    name, code, message = json.loads(result.response.body)
    assert (name, code) == ("InvalidInput", "invalid_input")
    assert "surrogate" in message
    assert '"t"' not in message
    assert "call" not in message
    assert host.kv == {"after": 1}


async def test_a_host_call_with_non_json_arguments_is_invalid_input(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest
) -> None:
    """Arguments no frame can carry are refused as the host would refuse them."""
    source = src("""
    def handle(e, ctx):
        out = []
        for value in ({1, 2}, float('nan'), object()):
            try:
                ctx.kv.set('k', value)
            except ctx.Error as exc:
                out.append(exc.code)
        return out
    """)
    result = await executor.execute(make_request(source), host)
    assert result.error is None, result.error
    assert result.response is not None
    assert json.loads(result.response.body) == ["invalid_input"] * 3
    assert host.kv == {}


@pytest.mark.parametrize("value", ["\\ud800", "\\U0001F600", "euro \\u20ac"])
async def test_ctx_response_refuses_a_header_value_past_latin_1(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest, value: str
) -> None:
    """A header value past Latin-1 (half a surrogate pair included) would go out as
    '?': ``ctx.response`` refuses it with a ValueError naming it, as it does every
    header HTTP cannot send."""
    source = (
        "def handle(e, ctx):\n"
        "    try:\n"
        f"        ctx.response('x', headers={{'X-S': '{value}'}})\n"
        "    except ValueError as exc:\n"
        "        return str(exc)\n"
    )
    result = await run_keeping_the_worker(executor, host, make_request, source)
    assert result.response is not None, result.error
    assert "cannot send (not Latin-1)" in result.response.body.decode()


@pytest.mark.parametrize(
    "response",
    [
        # changed after ctx.response checked it
        "(lambda r: (r.headers.append(('X-S', 'a\\r\\nb')), r)[1])(ctx.response('x'))",
        "(lambda r: (r.headers.append(('X-S', '\\ud800')), r)[1])(ctx.response('x'))",
        "(lambda r: (setattr(r, 'status', 101), r)[1])(ctx.response('x'))",
        "(lambda r: (setattr(r, 'body', 'text'), r)[1])(ctx.response('x'))",
        "'a\\ud800'",
        "{'a': '\\ud800'}",
    ],
)
async def test_a_response_http_cannot_carry_unaltered_is_an_invalid_return(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest, response: str
) -> None:
    """A response changed after ``ctx.response`` checked it (a header HTTP cannot send
    among them), or a body that is not Unicode, is an invalid return (502), checked
    when ``handle`` returns."""
    source = f"def handle(e, ctx):\n    return {response}\n"
    result = await run_keeping_the_worker(executor, host, make_request, source)
    assert result.error is not None, result.response
    assert result.error.kind is ExecErrorKind.INVALID_RETURN
    assert result.error.failure_kind is InboxFailureKind.SCRIPT_ERROR


async def test_latin_1_header_values_are_sent() -> None:
    """What Latin-1 can carry stays a valid header on both sides."""
    wired = ScriptResponse(200, (("X-L", "caf\u00e9 \u00ff"),), b"").to_wire()
    assert ScriptResponse.from_wire(wired).headers == (("X-L", "caf\u00e9 \u00ff"),)


@pytest.mark.parametrize("value", ["\U0001f600", "\u20ac", "\ud800"])
def test_the_host_refuses_a_header_value_past_latin_1(value: str) -> None:
    """A forged ``done`` frame meets the same rule on the host (a protocol violation)."""
    wired = {"status": 200, "headers": [["X-S", value]], "body": "", "body_encoding": "utf-8"}
    with pytest.raises(WireError):
        ScriptResponse.from_wire(wired)


@pytest.mark.parametrize(
    ("check", "value"),
    [
        (validation.key, "\ud800"),
        (validation.prefix, "a\udfff"),
        (validation.doc_id, "\ud800"),
        (validation.json_value, ["\ud800"]),
        (validation.document, {"\udc00": 1}),
    ],
)
def test_the_host_refuses_half_a_surrogate_pair_in_data(check: object, value: object) -> None:
    """A ``\\ud800`` escape in a forged call frame is refused by the host's checks."""
    with pytest.raises(InvalidInput, match="surrogate"):
        check(value)  # type: ignore[operator]


async def test_the_bridge_answers_half_a_surrogate_pair_with_invalid_input() -> None:
    """Through the bridge: an ``err`` frame, and the host never sees the call."""
    host = MemoryHostApi()
    reply = await HostBridge(host).serve(1, "kv_set", ["\ud800", 1])
    assert (reply["t"], reply["code"]) == ("err", "invalid_input")
    assert host.kv == {}
