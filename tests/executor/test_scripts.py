"""Normal paths: return forms, events, the host API, logs, errors, the compile cache."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable

import pytest

from executor_core.executor import ProcessExecutor
from executor_core.memory_host import MemoryHostApi
from picloud_shared.execution import ExecRequest, ScriptResponse
from picloud_shared.limits import MAX_LOG_BYTES, MAX_MESSAGE_CHARS, MAX_TRACEBACK_CHARS
from picloud_shared.responses import MAX_HEADERS
from picloud_shared.status import ExecErrorKind

MakeRequest = Callable[..., ExecRequest]

pytestmark = pytest.mark.anyio


def src(body: str) -> str:
    return textwrap.dedent(body).strip() + "\n"


@pytest.mark.parametrize(
    ("returned", "expected"),
    [
        ("{'a': 1}", ScriptResponse.json({"a": 1})),
        ("[1, 'x']", ScriptResponse.json([1, "x"])),
        ("42", ScriptResponse.json(42)),
        ("2.5", ScriptResponse.json(2.5)),
        ("True", ScriptResponse.json(True)),
        ("'héllo'", ScriptResponse.text("héllo")),
        ("None", ScriptResponse.empty()),
        (
            "ctx.response('made', status=201, headers={'x-a': 'b'})",
            ScriptResponse(
                201, (("content-type", "text/plain; charset=utf-8"), ("x-a", "b")), b"made"
            ),
        ),
        (
            "ctx.response({'k': [1]}, status=202)",
            ScriptResponse(202, (("content-type", "application/json"),), b'{"k":[1]}'),
        ),
        (
            "ctx.response(b'\\xff\\x00', headers={'Content-Type': 'image/x'})",
            ScriptResponse(200, (("Content-Type", "image/x"),), b"\xff\x00"),
        ),
        ("ctx.response(status=204)", ScriptResponse(204, (), b"")),
    ],
)
async def test_return_value_maps_to_response(
    executor: ProcessExecutor,
    host: MemoryHostApi,
    make_request: MakeRequest,
    returned: str,
    expected: ScriptResponse,
) -> None:
    """Each return form of API.md becomes the documented response."""
    result = await executor.execute(
        make_request(f"def handle(event, ctx):\n    return {returned}\n"), host
    )
    assert result.error is None
    assert result.response == expected


@pytest.mark.parametrize(
    "headers",
    [
        "{'X-A': 'a\\r\\nSet-Cookie: s=1'}",
        "{'X-A': 'nul\\x00'}",
        "{'X A': '1'}",
        "{'': '1'}",
    ],
)
async def test_a_header_no_server_can_send_is_refused_to_the_script(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest, headers: str
) -> None:
    """``ctx.response`` raises, so the script's traceback says which header is wrong."""
    result = await executor.execute(
        make_request(f"def handle(e, ctx):\n    return ctx.response('x', headers={headers})\n"),
        host,
    )
    assert result.error is not None
    assert result.error.kind is ExecErrorKind.UNCAUGHT_EXCEPTION
    assert "ValueError: header" in result.error.message


@pytest.mark.parametrize(
    ("headers", "ok"),
    [
        ("{f'X-{i}': '1' for i in range(99)}", True),  # and content-type: 100
        ("{f'X-{i}': '1' for i in range(100)}", False),
        (
            "{'X-Big': 'v' * (MAX_HEADER_BYTES - len('X-Big') - len(CTYPE))}",
            True,
        ),
        (
            "{'X-Big': 'v' * (MAX_HEADER_BYTES - len('X-Big') - len(CTYPE) + 1)}",
            False,
        ),
    ],
)
async def test_response_headers_are_bounded_in_number_and_size(
    executor: ProcessExecutor,
    host: MemoryHostApi,
    make_request: MakeRequest,
    headers: str,
    ok: bool,
) -> None:
    """At most MAX_HEADERS headers of MAX_HEADER_BYTES in all (the content-type that
    ``ctx.response`` adds counts): exactly at the edge is fine, one more is refused."""
    source = (
        "from picloud_shared.responses import MAX_HEADER_BYTES\n"
        "CTYPE = 'content-type' 'text/plain; charset=utf-8'\n"
        f"def handle(e, ctx):\n    return ctx.response('x', headers={headers})\n"
    )
    result = await executor.execute(make_request(source), host)
    if ok:
        assert result.error is None, result.error
        assert result.response is not None
        assert len(result.response.headers) <= MAX_HEADERS
    else:
        assert result.error is not None
        assert result.error.kind is ExecErrorKind.UNCAUGHT_EXCEPTION
        assert "ValueError: a response" in result.error.message


@pytest.mark.parametrize("status", ["100", "101", "199", "600", "True", "'200'"])
async def test_a_status_that_is_no_final_answer_is_refused_to_the_script(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest, status: str
) -> None:
    """A 1xx is not an answer (a 101 would switch protocols): 200-599 only."""
    result = await executor.execute(
        make_request(f"def handle(e, ctx):\n    return ctx.response('x', status={status})\n"),
        host,
    )
    assert result.error is not None
    assert result.error.kind is ExecErrorKind.UNCAUGHT_EXCEPTION
    assert "ValueError: status must be" in result.error.message


@pytest.mark.parametrize(
    ("statement", "kind"),
    [
        ("raise ValueError('x' * 10_000_000)", ExecErrorKind.UNCAUGHT_EXCEPTION),
        ("ctx.reject('r' * 9_000_000)", ExecErrorKind.REJECTED),
    ],
)
async def test_a_huge_error_message_is_cut_not_a_broken_frame(
    executor: ProcessExecutor,
    host: MemoryHostApi,
    make_request: MakeRequest,
    statement: str,
    kind: ExecErrorKind,
) -> None:
    """A message bigger than a frame is cut in the worker (MAX_MESSAGE_CHARS), so the
    execution fails as the script's error, not as a broken channel."""
    result = await executor.execute(make_request(f"def handle(e, ctx):\n    {statement}\n"), host)
    assert result.error is not None
    assert result.error.kind is kind
    assert 100 < len(result.error.message) <= MAX_MESSAGE_CHARS
    assert result.error.traceback is None or len(result.error.traceback) <= MAX_TRACEBACK_CHARS


async def test_script_text_with_nul_comes_back_storable(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest
) -> None:
    """Logs and error messages are stored as text: a NUL becomes U+FFFD."""
    source = "def handle(e, ctx):\n    print('a\\x00b')\n    raise ValueError('c\\x00d')\n"
    result = await executor.execute(make_request(source), host)
    assert result.error is not None
    assert result.error.message == "ValueError: c\ufffdd"
    assert result.error.traceback is not None
    assert "\x00" not in result.error.traceback
    assert result.logs == ("a\ufffdb",)


@pytest.mark.parametrize("value", ["b'bytes'", "object()", "{1, 2}", "float('nan')", "{'a': {1}}"])
async def test_unmappable_return_is_invalid_return(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest, value: str
) -> None:
    """Anything else is invalid_return."""
    result = await executor.execute(
        make_request(f"def handle(e, ctx):\n    return {value}\n"), host
    )
    assert result.error is not None
    assert result.error.kind is ExecErrorKind.INVALID_RETURN


@pytest.mark.parametrize(
    "event",
    [
        {
            "method": "POST",
            "path": "/x/1",
            "params": {"id": "1"},
            "query": {"q": "a"},
            "headers": {"content-type": "application/json"},
            "body": '{"a": 1}',
            "json": {"a": 1},
        },
        {"kind": "kv", "key": "k", "op": "set", "value": {"n": 1}, "prev_value": None},
        {
            "kind": "docs",
            "collection": "c",
            "id": "d1",
            "op": "update",
            "data": {"a": 2},
            "prev_data": {"a": 1},
        },
        {
            "kind": "dead_letter",
            "dead_letter_id": "x",
            "source_kind": "kv",
            "event": {"kind": "kv"},
            "error": {"kind": "timeout", "message": "m"},
            "attempts": 5,
        },
    ],
)
async def test_event_reaches_script_unchanged(
    executor: ProcessExecutor,
    host: MemoryHostApi,
    make_request: MakeRequest,
    event: dict[str, object],
) -> None:
    """Route, kv, docs and dead-letter events arrive as the script's ``event``."""
    result = await executor.execute(
        make_request("def handle(e, ctx):\n    return e\n", event), host
    )
    assert result.response is not None
    assert json.loads(result.response.body) == event


async def test_ctx_fields(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest
) -> None:
    """ctx carries app, execution_id, attempt, trigger_depth and principal."""
    request = make_request(
        src("""
        def handle(e, ctx):
            return [ctx.app, ctx.execution_id, ctx.attempt, ctx.trigger_depth, ctx.principal]
        """),
        app_name="shop",
        attempt=3,
        trigger_depth=2,
    )
    result = await executor.execute(request, host)
    assert result.response is not None
    assert json.loads(result.response.body) == [
        "shop",
        str(request.execution_id),
        3,
        2,
        str(request.principal.user_id),
    ]


async def test_every_host_call(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest
) -> None:
    """kv get/set/delete/list and docs insert/get/update/delete/query reach the host."""
    source = src("""
    def handle(e, ctx):
        out = {}
        ctx.kv.set("a:1", {"v": 1})
        ctx.kv.set("a:2", [2])
        ctx.kv.set("b", "x")
        out["get"] = ctx.kv.get("a:1")
        out["missing"] = ctx.kv.get("nope")
        out["list"] = ctx.kv.list("a:")
        out["list1"] = ctx.kv.list(limit=1)
        out["del"] = [ctx.kv.delete("b"), ctx.kv.delete("b")]
        i = ctx.docs.insert("users", {"name": "ann", "age": 3})
        ctx.docs.insert("users", {"name": "bob", "age": 3}, id="bob")
        out["doc"] = ctx.docs.get("users", i)
        ctx.docs.update("users", "bob", {"name": "bob", "age": 4})
        out["q"] = ctx.docs.query("users", where={"age": 4})
        out["qall"] = len(ctx.docs.query("users"))
        out["ddel"] = [ctx.docs.delete("users", i), ctx.docs.delete("users", i)]
        out["gone"] = ctx.docs.get("users", i)
        return out
    """)
    result = await executor.execute(make_request(source), host)
    assert result.error is None, result.error
    assert result.response is not None
    out = json.loads(result.response.body)
    assert out["get"] == {"v": 1}
    assert out["missing"] is None
    assert out["list"] == [{"key": "a:1", "value": {"v": 1}}, {"key": "a:2", "value": [2]}]
    assert out["list1"] == [{"key": "a:1", "value": {"v": 1}}]
    assert out["del"] == [True, False]
    assert out["doc"] == {"name": "ann", "age": 3}
    assert out["q"] == [{"id": "bob", "data": {"name": "bob", "age": 4}}]
    assert out["qall"] == 2
    assert out["ddel"] == [True, False]
    assert out["gone"] is None
    assert host.kv == {"a:1": {"v": 1}, "a:2": [2]}
    assert host.docs["users"] == {"bob": {"name": "bob", "age": 4}}


async def test_host_error_is_catchable_with_code(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest
) -> None:
    """A host error is raised in the script as an exception carrying code and message."""
    source = src("""
    def handle(e, ctx):
        out = []
        for call in (lambda: ctx.kv.set("k" * 600, 1),
                     lambda: ctx.kv.set("k", "x" * 300_000),
                     lambda: ctx.docs.update("c", "nope", {}),
                     lambda: ctx.docs.insert("bad name!", {}),
                     lambda: ctx.kv.list(limit=0)):
            try:
                call()
            except ctx.Error as exc:
                out.append([type(exc).__name__, exc.code, bool(exc.message)])
        ctx.docs.insert("c", {}, id="x")
        try:
            ctx.docs.insert("c", {}, id="x")
        except Exception as exc:
            out.append([type(exc).__name__, exc.code, bool(exc.message)])
        return out
    """)
    result = await executor.execute(make_request(source), host)
    assert result.response is not None, result.error
    assert json.loads(result.response.body) == [
        ["LimitExceeded", "limit_exceeded", True],
        ["PayloadTooLarge", "payload_too_large", True],
        ["NotFound", "not_found", True],
        ["InvalidName", "invalid_name", True],
        ["InvalidInput", "invalid_input", True],
        ["Conflict", "conflict", True],
    ]
    assert host.kv == {}


# Walks every key under "p:" and every document of "c" with k == 1 in pages of two,
# each page asked for after the last key or id of the one before (keyword and
# positional), then asks past the last of each. Shared with the PostgreSQL suite.
PAGING = src("""
def handle(e, ctx):
    out = {"keys": [], "pages": [], "docs": [], "doc_pages": []}
    after = None
    while len(out["pages"]) < 20:
        page = ctx.kv.list("p:", 2, after=after)
        out["pages"].append(len(page))
        if not page:
            break
        out["keys"] += [entry["key"] for entry in page]
        after = page[-1]["key"]
    after = None
    while len(out["doc_pages"]) < 20:
        page = ctx.docs.query("c", {"k": 1}, 2, after)
        out["doc_pages"].append(len(page))
        if not page:
            break
        out["docs"] += [doc["id"] for doc in page]
        after = page[-1]["id"]
    out["past"] = [
        ctx.kv.list(prefix="p:", after=out["keys"][-1]),
        ctx.kv.list("p:", after="p:~"),
        ctx.docs.query("c", where={"k": 1}, after=out["docs"][-1]),
        ctx.docs.query("c", after="zzz"),
    ]
    out["first"] = ctx.kv.list("p:", 1, None) + ctx.docs.query("c", None, 1, None)
    return out
""")
PAGED_KEYS = ["p:0", "p:1", "p:2", "p:3", "p:4", "p:5", "p:6"]
OTHER_KEYS = ["o:9", "p", "q:0", "p;"]  # ";" sorts right after ":"
PAGED_DOCS = ["a", "b", "d1", "d2", "d3"]
OTHER_DOCS = ["c", "d0", "e"]  # k == 2
DOCS_INSERTED = ["d3", "e", "a", "d0", "d2", "c", "b", "d1"]  # out of order


def paging_expected() -> dict[str, object]:
    """What ``PAGING`` answers over PAGED_*/OTHER_* (whatever their insertion order)."""
    return {
        "keys": PAGED_KEYS,
        "pages": [2, 2, 2, 1, 0],
        "docs": PAGED_DOCS,
        "doc_pages": [2, 2, 1, 0],
        "past": [[], [], [], []],
        "first": [{"key": "p:0", "value": 0}, {"id": "a", "data": {"k": 1}}],
    }


async def test_a_script_pages_through_kv_list_and_docs_query_with_after(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest
) -> None:
    """``after`` gives the next page: every key of a prefix, and every document a
    where matches, comes exactly once and in order; after the last one, nothing."""
    for key in reversed(PAGED_KEYS + OTHER_KEYS):
        host.kv[key] = int(key[2:]) if key[2:].isdigit() else key
    assert sorted(DOCS_INSERTED) == sorted(PAGED_DOCS + OTHER_DOCS)
    for doc_id in DOCS_INSERTED:
        await host.docs_insert("c", {"k": 1 if doc_id in PAGED_DOCS else 2}, id=doc_id)
    result = await executor.execute(make_request(PAGING), host)
    assert result.error is None, result.error
    assert result.response is not None
    assert json.loads(result.response.body) == paging_expected()


async def test_after_pages_in_code_point_order(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest
) -> None:
    """Keys and ids sort as their UTF-8 bytes do (code points): "Z" < "a" < "é" < "😀"."""
    keys = ["k:Z", "k:a", "k:z", "k:é", "k:😀"]
    for key in reversed(keys):
        host.kv[key] = 1
        await host.docs_insert("c", {}, id=key)
    source = src("""
    def handle(e, ctx):
        out = [[], []]
        after = None
        while page := ctx.kv.list("k:", limit=1, after=after):
            out[0].append(page[0]["key"])
            after = page[0]["key"]
            if len(out[0]) > 10:
                break
        after = None
        while page := ctx.docs.query("c", limit=1, after=after):
            out[1].append(page[0]["id"])
            after = page[0]["id"]
            if len(out[1]) > 10:
                break
        return out
    """)
    result = await executor.execute(make_request(source), host)
    assert result.response is not None, result.error
    assert json.loads(result.response.body) == [keys, keys]


async def test_a_bad_after_is_a_catchable_error_that_reaches_no_host(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest
) -> None:
    """``after`` is checked as a key (kv) or a document id (docs) is, with the same
    codes; a wrong type is ``invalid_input``. None of them reaches the host."""
    source = src("""
    def handle(e, ctx):
        out = []
        for call in (lambda: ctx.kv.list(after="k" * 513),
                     lambda: ctx.kv.list("", 10, "é" * 257),
                     lambda: ctx.kv.list(after="a\\x00b"),
                     lambda: ctx.kv.list(after=""),
                     lambda: ctx.kv.list(after=5),
                     lambda: ctx.docs.query("c", after="d" * 129),
                     lambda: ctx.docs.query("c", None, 10, "a\\x00"),
                     lambda: ctx.docs.query("c", after=""),
                     lambda: ctx.docs.query("c", after=["d"])):
            try:
                call()
                out.append(None)
            except ctx.Error as exc:
                out.append([type(exc).__name__, exc.code, "after" in exc.message])
        return out
    """)
    result = await executor.execute(make_request(source), host)
    assert result.response is not None, result.error
    limit = ["LimitExceeded", "limit_exceeded", True]
    invalid = ["InvalidInput", "invalid_input", True]
    kv = [limit, limit, invalid, invalid, invalid]
    docs = [limit, invalid, invalid, invalid]
    assert json.loads(result.response.body) == kv + docs
    assert host.calls == 0


async def test_logs_and_print_are_captured(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest
) -> None:
    """ctx.log and print become log lines, in order, also handed to host.log."""
    source = src("""
    import sys
    def handle(e, ctx):
        ctx.log("one", 2, {"x": 3})
        print("two")
        print("three", end="")
        sys.stderr.write("four\\n")
    """)
    result = await executor.execute(make_request(source), host)
    assert result.error is None
    assert result.logs == ("one 2 {'x': 3}", "two", "threefour")
    assert host.logs == list(result.logs)


async def test_logs_over_cap_are_output_limit(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest
) -> None:
    """Logging past MAX_LOG_BYTES fails the execution with output_limit; logs stay capped."""
    source = "def handle(e, ctx):\n    for i in range(100000):\n        ctx.log('x' * 100)\n"
    result = await executor.execute(make_request(source), host)
    assert result.error is not None
    assert result.error.kind is ExecErrorKind.OUTPUT_LIMIT
    assert 0 < sum(len(line) + 1 for line in result.logs) <= MAX_LOG_BYTES


@pytest.mark.parametrize("line", ["''", "'\\n' * 50", "'x'"])
async def test_log_lines_count_their_newline_against_the_cap(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest, line: str
) -> None:
    """Every line costs its bytes plus one: empty lines (ctx.log(''), print()) cannot
    fill the execution record without limit; exactly the cap is allowed."""
    fits = f"def handle(e, ctx):\n    for _ in range({MAX_LOG_BYTES} // 2):\n        ctx.log('x')\n"
    ok = await executor.execute(make_request(fits), host)
    assert ok.error is None
    assert len(ok.logs) == MAX_LOG_BYTES // 2
    flood = f"def handle(e, ctx):\n    while True:\n        ctx.log({line})\n"
    if "\\n" in line:
        flood = f"def handle(e, ctx):\n    while True:\n        print({line}, end='')\n"
    result = await executor.execute(make_request(flood), host)
    assert result.error is not None
    assert result.error.kind is ExecErrorKind.OUTPUT_LIMIT
    assert sum(len(x) + 1 for x in result.logs) <= MAX_LOG_BYTES
    assert len(result.logs) <= MAX_LOG_BYTES


async def test_compile_cache_hit_after_first_call(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest
) -> None:
    """The module body runs once per worker; later calls reuse the compiled script."""
    source = src("""
    import os
    COUNT = [0]
    def handle(e, ctx):
        COUNT[0] += 1
        return [COUNT[0], os.getpid()]
    """)
    first = await executor.execute(make_request(source), host)
    second = await executor.execute(make_request(source), host)
    assert first.response is not None
    assert second.response is not None
    (n1, pid1), (n2, pid2) = json.loads(first.response.body), json.loads(second.response.body)
    assert pid1 == pid2
    assert (n1, n2) == (1, 2)
    assert executor.compiles == 1
    assert executor.cache_hits == 1


async def test_new_script_version_takes_effect(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest
) -> None:
    """Version 2 of a script replaces version 1 in a warm worker."""
    v1 = make_request("def handle(e, ctx):\n    return 1\n")
    v2 = make_request(
        "def handle(e, ctx):\n    return 2\n", script_id=v1.script_id, script_version=2
    )
    r1 = await executor.execute(v1, host)
    r2 = await executor.execute(v2, host)
    assert r1.response is not None
    assert r2.response is not None
    assert (r1.response.body, r2.response.body) == (b"1", b"2")


@pytest.mark.parametrize(
    ("source", "kind"),
    [
        ("def handle(e, ctx):\n    return (\n", ExecErrorKind.SYNTAX_ERROR),
        ("x = 1\n", ExecErrorKind.MISSING_HANDLER),
        ("handle = 3\n", ExecErrorKind.MISSING_HANDLER),
        ("def handle(e, ctx):\n    ctx.reject('no way')\n", ExecErrorKind.REJECTED),
        ("raise ValueError('at import')\n", ExecErrorKind.UNCAUGHT_EXCEPTION),
    ],
)
async def test_script_errors_are_classified(
    executor: ProcessExecutor,
    host: MemoryHostApi,
    make_request: MakeRequest,
    source: str,
    kind: ExecErrorKind,
) -> None:
    """Syntax errors, a missing handle, rejection and import-time errors have their kinds."""
    result = await executor.execute(make_request(source), host)
    assert result.error is not None
    assert result.error.kind is kind


async def test_reject_carries_message(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest
) -> None:
    """ctx.reject's message is the error message, even through a broad except."""
    source = src("""
    def handle(e, ctx):
        try:
            ctx.reject("bad input")
        except Exception:
            return "swallowed"
    """)
    result = await executor.execute(make_request(source), host)
    assert result.error is not None
    assert (result.error.kind, result.error.message) == (ExecErrorKind.REJECTED, "bad input")


async def test_uncaught_traceback_is_the_scripts_own(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest
) -> None:
    """The traceback names the script's lines and no executor frame."""
    source = src("""
    def helper():
        raise KeyError("boom")
    def handle(e, ctx):
        helper()
    """)
    result = await executor.execute(make_request(source), host)
    assert result.error is not None
    assert result.error.kind is ExecErrorKind.UNCAUGHT_EXCEPTION
    assert result.error.message == "KeyError: 'boom'"
    tb = result.error.traceback or ""
    assert 'raise KeyError("boom")' in tb
    assert "helper()" in tb
    assert "executor_core" not in tb
    assert "worker.py" not in tb


async def test_a_huge_message_leaves_the_traceback_its_frames_and_type(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest
) -> None:
    """A 30 000-character message is cut in the traceback too, so the traceback
    (kept by its end, 16 000 characters) still has the script's frames, the
    exception's type and the message's start."""
    source = src("""
    def helper():
        raise ValueError("v" * 30000)
    def handle(e, ctx):
        helper()
    """)
    result = await executor.execute(make_request(source), host)
    assert result.error is not None
    tb = result.error.traceback or ""
    assert 'raise ValueError("v" * 30000)' in tb
    assert "helper()" in tb
    assert "ValueError: vvvv" in tb
    assert "[28000 more characters]" in tb


async def test_library_frames_are_named_from_the_librarys_root(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest
) -> None:
    """A frame of the standard library the script called into keeps its file, line
    and code, but named from the library's root: no path of the host shows."""
    source = src("""
    import json
    def handle(e, ctx):
        json.loads("{nope")
    """)
    result = await executor.execute(make_request(source), host)
    assert result.error is not None
    tb = result.error.traceback or ""
    assert 'File "<python>/json/decoder.py", line' in tb, tb
    assert 'json.loads("{nope")' in tb
    assert "obj, end = self.scan_once(s, idx)" in tb  # the library's line is still read
    for host_path in ("/usr/", "/root/", "/proc/", "lib/python3"):
        assert host_path not in tb, tb


async def test_worker_survives_uncaught_exception(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest
) -> None:
    """A script error does not cost the app its warm worker."""
    pid_src = "import os\ndef handle(e, ctx):\n    return os.getpid()\n"
    a = await executor.execute(make_request(pid_src), host)
    await executor.execute(make_request("def handle(e, ctx):\n    1/0\n"), host)
    b = await executor.execute(make_request(pid_src), host)
    assert a.response is not None
    assert b.response is not None
    assert a.response.body == b.response.body


# An integer of more digits than Python converts to or from text by default (4300):
# no JSON picloud carries, whatever limit the script sets for itself.
LIFT_INT_LIMIT = "import sys\nsys.set_int_max_str_digits(0)\n"


@pytest.mark.parametrize("lifted", [False, True], ids=["default", "limit-lifted"])
@pytest.mark.parametrize(
    "call",
    [
        "ctx.kv.set('h', 10**5000)",
        "ctx.kv.set('h', {'a': [-10**4300]})",
        "ctx.docs.insert('c', {'a': 10**5000})",
        "ctx.docs.update('c', 'd', {'a': 10**5000})",
        "ctx.docs.query('c', where={'a': 10**5000})",
        "ctx.kv.list('', 10**5000)",
    ],
)
async def test_an_integer_too_long_for_json_is_invalid_input_to_the_script(
    executor: ProcessExecutor,
    host: MemoryHostApi,
    make_request: MakeRequest,
    call: str,
    lifted: bool,
) -> None:
    """A host call carrying an int of more than 4300 digits raises a catchable
    InvalidInput in the script, also after ``sys.set_int_max_str_digits(0)``; the
    worker survives it and the host stores nothing."""
    source = (LIFT_INT_LIMIT if lifted else "import sys\n") + src(f"""
    import os
    def handle(e, ctx):
        try:
            {call}
        except ctx.Error as exc:
            caught = [type(exc).__name__, exc.code, "4300" in exc.message]
        else:
            caught = None
        ctx.kv.set("after", 1)  # the channel still works
        return [caught, os.getpid()]
    """)
    result = await executor.execute(make_request(source), host)
    assert result.error is None, result.error
    assert result.response is not None
    caught, pid = json.loads(result.response.body)
    assert caught == ["InvalidInput", "invalid_input", True]
    assert host.kv == {"after": 1}
    assert host.docs == {}
    again = await executor.execute(make_request(source), host)
    assert again.response is not None, again.error
    assert json.loads(again.response.body)[1] == pid  # the same worker


@pytest.mark.parametrize(
    "value", ["10**5000", "-10**4300", "{'a': [1, 10**5000]}", "ctx.response({'a': 10**5000})"]
)
async def test_returning_an_integer_too_long_for_json_is_invalid_return(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest, value: str
) -> None:
    """After ``sys.set_int_max_str_digits(0)`` a huge int is still no JSON to return:
    invalid_return (``ctx.response`` raises ValueError in the script), never a body
    no client can parse; the worker is kept."""
    source = LIFT_INT_LIMIT + f"def handle(e, ctx):\n    return {value}\n"
    result = await executor.execute(make_request(source), host)
    assert result.error is not None, result.response
    if value.startswith("ctx.response"):
        assert result.error.kind is ExecErrorKind.UNCAUGHT_EXCEPTION
        assert result.error.message.startswith("ValueError:")
    else:
        assert result.error.kind is ExecErrorKind.INVALID_RETURN
    assert "4300" in result.error.message
    at_limit = LIFT_INT_LIMIT + "def handle(e, ctx):\n    return [10**4300 - 1, -10**4300 + 1]\n"
    ok = await executor.execute(make_request(at_limit), host)
    assert ok.response is not None, ok.error
    assert ok.response.body == f"[{'9' * 4300},-{'9' * 4300}]".encode()


@pytest.mark.parametrize(
    ("call", "code"),
    [
        ("ctx.kv.get('k' * 10**7)", "limit_exceeded"),
        ("ctx.kv.delete('k' * 10**7)", "limit_exceeded"),
        ("ctx.kv.list('k' * 10**7)", "limit_exceeded"),
        ("ctx.kv.set('k', 'x' * 10**7)", "payload_too_large"),
        ("ctx.kv.set('k' * 10**7, 'x' * 10**7)", "limit_exceeded"),  # the key is checked first
        ("ctx.docs.insert('c', {'a': 'x' * 10**7})", "payload_too_large"),
        ("ctx.docs.update('c', 'd', {'a': ['x' * 10**6] * 10})", "payload_too_large"),
        ("ctx.docs.get('c', 'd' * 10**7)", "limit_exceeded"),
        ("ctx.docs.query('c', where={'a': 'x' * 10**7})", "limit_exceeded"),
    ],
)
async def test_a_host_call_too_big_for_a_frame_is_refused_in_the_script(
    executor: ProcessExecutor,
    host: MemoryHostApi,
    make_request: MakeRequest,
    call: str,
    code: str,
) -> None:
    """Arguments bigger than a frame may be (8 MiB) raise, in the script, the error the
    host gives a smaller argument over its limit: the call never leaves the worker,
    which survives it."""
    source = src(f"""
    import os
    def handle(e, ctx):
        try:
            {call}
        except ctx.Error as exc:
            caught = [exc.code, bool(exc.message)]
        else:
            caught = None
        ctx.kv.set("after", 1)
        return [caught, os.getpid()]
    """)
    result = await executor.execute(make_request(source), host)
    assert result.error is None, result.error
    assert result.response is not None
    caught, pid = json.loads(result.response.body)
    assert caught == [code, True]
    assert host.kv == {"after": 1}
    assert host.calls == 1
    again = await executor.execute(make_request(source), host)
    assert again.response is not None, again.error
    assert json.loads(again.response.body)[1] == pid


async def test_a_script_may_start_with_a_byte_order_mark(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest
) -> None:
    """A UTF-8 BOM (as Windows editors write) is dropped before compiling; tracebacks
    keep the script's line numbers and lines."""
    ok = await executor.execute(make_request("\ufeffdef handle(e, ctx):\n    return 1\n"), host)
    assert ok.response is not None, ok.error
    assert ok.response.body == b"1"
    source = "\ufeff# saved on Windows\ndef handle(e, ctx):\n    x = 1\n    raise KeyError('3')\n"
    failed = await executor.execute(make_request(source), host)
    assert failed.error is not None
    assert failed.error.kind is ExecErrorKind.UNCAUGHT_EXCEPTION
    assert failed.error.traceback is not None
    assert "line 4, in handle\n    raise KeyError('3')" in failed.error.traceback
    bad = await executor.execute(make_request("\ufeffdef handle(e, ctx):\n    return (\n"), host)
    assert bad.error is not None
    assert bad.error.kind is ExecErrorKind.SYNTAX_ERROR
    assert "line 2" in bad.error.message
    assert "U+FEFF" not in bad.error.message


@pytest.mark.parametrize(
    "call",
    [
        "ctx.kv.set('k', {1: 2, '1': 3})",
        "ctx.kv.set('k', [{'a': {True: 1}}])",
        "ctx.docs.insert('c', {'a': {None: 1}})",
        "ctx.docs.update('c', 'd', {'a': [{2.5: 1}]})",
        "ctx.docs.query('c', where={'a': {1: 1}})",
    ],
)
async def test_a_dict_key_that_is_not_a_string_is_invalid_input_to_the_script(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest, call: str
) -> None:
    """JSON would make ``1``, ``True`` or ``None`` a string key (and ``{1: 2, "1": 3}``
    one key, silently dropping a value): the call raises a catchable InvalidInput
    naming the key instead, and stores nothing."""
    source = src(f"""
    def handle(e, ctx):
        try:
            {call}
        except ctx.Error as exc:
            return [exc.code, exc.message]
    """)
    result = await executor.execute(make_request(source), host)
    assert result.response is not None, result.error
    code, message = json.loads(result.response.body)
    assert code == "invalid_input"
    assert "a dict key must be a string, not" in message
    assert host.kv == {}
    assert host.docs == {}
