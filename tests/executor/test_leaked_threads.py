"""A ``ctx`` belongs to its execution: a thread that outlives it reaches the host no more.

Its host calls and ``ctx.log`` raise ``execution_ended`` in that thread, inside the
worker, so they never land in a later execution's transaction (committed with it,
or rolled back with it), nor break that execution's frames.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable

import pytest

from executor_core.executor import ProcessExecutor
from executor_core.memory_host import MemoryHostApi
from picloud_shared.execution import ExecRequest, ExecResult

MakeRequest = Callable[..., ExecRequest]
pytestmark = pytest.mark.anyio

# Script A: on "start", a daemon thread writes leaked:NN every 0.1 s for 3 s through
# A's ctx (the first write while A still runs), noting what each write did; on
# "report", what the thread saw.
LEAKER = textwrap.dedent("""
    import os, threading, time
    SEEN = []
    def leak(ctx, first):
        for i in range(30):
            try:
                ctx.kv.set("leaked:%02d" % i, i)
                SEEN.append("ok")
            except ctx.Error as exc:
                SEEN.append(exc.code + ": " + exc.message)
            if i == 0:
                first.set()
            time.sleep(0.1)
        try:
            ctx.log("late line")
        except ctx.Error as exc:
            SEEN.append("log " + exc.code)
    def handle(e, ctx):
        if e.get("report"):
            return {"pid": os.getpid(), "seen": list(SEEN)}
        first = threading.Event()
        threading.Thread(target=leak, args=(ctx, first), daemon=True).start()
        first.wait(5)
        return {"pid": os.getpid()}
""")

# Script B: runs for ``sleep`` seconds, writes its own key, and fails if asked to.
SLEEPER = textwrap.dedent("""
    import os, time
    def handle(e, ctx):
        time.sleep(e.get("sleep", 0))
        ctx.kv.set("b", e.get("n", 0))
        if e.get("fail"):
            raise RuntimeError("b fails")
        return {"pid": os.getpid()}
""")


def body(result: ExecResult) -> dict[str, object]:
    assert result.error is None, result.error
    assert result.response is not None
    return json.loads(result.response.body)  # type: ignore[no-any-return]


async def test_a_leaked_thread_never_writes_into_a_later_execution(
    executor: ProcessExecutor, make_request: MakeRequest
) -> None:
    """Script A leaves a thread writing through its ctx; script B of the same app then
    runs 1 s in the same worker: B's transaction holds only B's write, A's holds the
    write made while A ran, and the thread's later writes failed in the thread."""
    host_a, host_b = MemoryHostApi(), MemoryHostApi()
    a = body(await executor.execute(make_request(LEAKER), host_a))
    b = body(await executor.execute(make_request(SLEEPER, {"sleep": 1, "n": 1}), host_b))
    assert b["pid"] == a["pid"], "B must run in the worker A's thread lives in"
    assert host_b.kv == {"b": 1}
    assert host_a.kv == {"leaked:00": 0}
    report = body(await executor.execute(make_request(LEAKER, {"report": True}), MemoryHostApi()))
    assert report["pid"] == a["pid"]
    seen = report["seen"]
    assert isinstance(seen, list)
    assert seen[0] == "ok"
    assert len(seen) > 5
    assert all(s == "execution_ended: " + ENDED for s in seen[1:]), seen


ENDED = (
    "this execution has ended: its ctx reaches the host no more "
    "(a thread or a global outlived it; use the ctx handle() is given)"
)


async def test_a_failing_execution_rolls_back_nothing_of_a_leaked_thread(
    executor: ProcessExecutor, make_request: MakeRequest
) -> None:
    """Nor does a leaked write ride along with a later execution that fails: that
    execution's host sees only its own write."""
    host_a, host_b = MemoryHostApi(), MemoryHostApi()
    a = body(await executor.execute(make_request(LEAKER), host_a))
    result = await executor.execute(make_request(SLEEPER, {"sleep": 1, "fail": True}), host_b)
    assert result.error is not None
    assert result.error.message == "RuntimeError: b fails"
    assert host_b.kv == {"b": 0}
    pid = body(await executor.execute(make_request(SLEEPER), MemoryHostApi()))["pid"]
    assert pid == a["pid"]


async def test_a_leaked_thread_calling_between_executions_breaks_none_of_them(
    executor: ProcessExecutor, make_request: MakeRequest
) -> None:
    """A thread calling the host every few ms through an ended ctx, also while the
    worker waits between executions, sends no frame: the following executions all
    succeed in the same worker, none sees a foreign frame."""
    source = textwrap.dedent("""
        import os, threading, time
        def chatter(ctx):
            for _ in range(2000):
                try:
                    ctx.kv.get("x")
                except ctx.Error:
                    pass
                try:
                    ctx.log("chatter")
                except ctx.Error:
                    pass
                time.sleep(0.001)
        def handle(e, ctx):
            threading.Thread(target=chatter, args=(ctx,), daemon=True).start()
            return {"pid": os.getpid()}
    """)
    host = MemoryHostApi()
    first = body(await executor.execute(make_request(source), host))
    for n in range(40):
        result = await executor.execute(make_request(SLEEPER, {"n": n}), host)
        assert body(result)["pid"] == first["pid"]
        assert result.logs == ()
    assert host.kv == {"b": 39}


async def test_a_ctx_kept_in_a_global_is_refused_in_a_later_execution(
    executor: ProcessExecutor, make_request: MakeRequest
) -> None:
    """The rule is the ctx's, not the thread's: an earlier execution's ctx used by a
    later one raises ``ExecutionEnded``, and that execution's own ctx still works."""
    source = textwrap.dedent("""
        KEPT = []
        def handle(e, ctx):
            if not KEPT:
                KEPT.append(ctx)
                return None
            try:
                KEPT[0].kv.set("old", 1)
            except ctx.Error as exc:
                caught = [type(exc).__name__, exc.code]
            ctx.kv.set("new", 1)
            return caught
    """)
    host = MemoryHostApi()
    await executor.execute(make_request(source), host)
    result = await executor.execute(make_request(source), host)
    assert body(result) == ["ExecutionEnded", "execution_ended"]  # type: ignore[comparison-overlap]
    assert host.kv == {"new": 1}


async def test_a_leaked_thread_prints_into_no_later_execution_log(
    executor: ProcessExecutor, make_request: MakeRequest
) -> None:
    """A thread left printing by one execution is not in a later execution's logs,
    while that later execution's own threads print into them as its own lines."""
    printer = textwrap.dedent("""
        import os, threading, time
        def chatter(first):
            for i in range(300):
                print("leaked", i)
                first.set()
                time.sleep(0.01)
        def handle(e, ctx):
            first = threading.Event()
            threading.Thread(target=chatter, args=(first,), daemon=True).start()
            first.wait(5)
            return {"pid": os.getpid()}
    """)
    own_thread = textwrap.dedent("""
        import os, threading, time
        def handle(e, ctx):
            time.sleep(0.5)
            t = threading.Thread(target=print, args=("mine",))
            t.start()
            t.join()
            print("main")
            return {"pid": os.getpid()}
    """)
    first = await executor.execute(make_request(printer), MemoryHostApi())
    assert first.logs[:1] == ("leaked 0",)
    later = await executor.execute(make_request(own_thread), MemoryHostApi())
    assert body(later)["pid"] == body(first)["pid"]
    assert later.logs == ("mine", "main")
