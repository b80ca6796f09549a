"""A script's threads are bounded by RLIMIT_NPROC (32 tasks per worker), not first by
its memory limit: at the default 128 MiB it can run 31 threads besides its main one,
and a thread's smaller stack still ends deep recursion as a ``RecursionError``.
"""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Callable

import pytest

from executor_core.executor import ProcessExecutor
from executor_core.memory_host import MemoryHostApi
from picloud_shared.execution import ExecRequest, ExecResult
from picloud_shared.limits import DEFAULT_MEMORY_LIMIT_MB
from picloud_shared.status import ExecErrorKind, InboxFailureKind, failure_kind_for

MakeRequest = Callable[..., ExecRequest]
pytestmark = pytest.mark.anyio

# Starts e["threads"] threads that each hold e["alloc"] bytes until all are running
# (a barrier: they are alive at once), then, if asked, allocates e["hog"] bytes while
# they still run; joins them. Returns how many it started and how starting the next
# one failed.
THREADS = textwrap.dedent("""
    import threading
    def handle(e, ctx):
        n = e["threads"]
        barrier = threading.Barrier(n + 1, timeout=10)
        release = threading.Event()
        def work():
            held = bytearray(e["alloc"])
            held[-1] = 1
            barrier.wait()
            release.wait(10)
        started, failed = [], None
        try:
            for _ in range(n):
                t = threading.Thread(target=work)
                t.start()
                started.append(t)
        except RuntimeError as exc:
            failed = f"{type(exc).__name__}: {exc}"
            barrier.abort()
        try:
            if failed is None:
                barrier.wait()
                if e.get("hog"):
                    return len(bytearray(e["hog"]))
        finally:
            release.set()
            for t in started:
                t.join()
        return [len(started), failed]
""")


def body(result: ExecResult) -> object:
    assert result.error is None, result.error
    assert result.response is not None
    return json.loads(result.response.body)


async def test_thirty_threads_that_allocate_run_at_the_default_memory_limit(
    executor: ProcessExecutor, make_request: MakeRequest
) -> None:
    """30 threads alive at once, each holding 1 MiB, at the default memory limit."""
    request = make_request(THREADS, {"threads": 30, "alloc": 1 << 20})
    assert request.memory_limit_mb == DEFAULT_MEMORY_LIMIT_MB
    assert body(await executor.execute(request, MemoryHostApi())) == [30, None]


@pytest.mark.skipif(os.geteuid() != 0, reason="RLIMIT_NPROC is set with the uid drop (root)")
async def test_the_thread_past_rlimit_nproc_is_a_runtime_error(
    executor: ProcessExecutor, make_request: MakeRequest
) -> None:
    """At the default memory limit a script starts 31 threads (32 tasks with its main
    thread, RLIMIT_NPROC); starting one more raises RuntimeError from threading."""
    request = make_request(THREADS, {"threads": 40, "alloc": 1 << 16})
    assert body(await executor.execute(request, MemoryHostApi())) == [
        31,
        "RuntimeError: can't start new thread",
    ]


async def test_with_thirty_threads_running_the_memory_limit_still_holds(
    executor: ProcessExecutor, make_request: MakeRequest
) -> None:
    """A 1 GiB allocation while 30 threads run is memory_limit: what made room for the
    threads did not loosen RLIMIT_AS."""
    request = make_request(THREADS, {"threads": 30, "alloc": 1 << 16, "hog": 1 << 30})
    result = await executor.execute(request, MemoryHostApi())
    assert result.error is not None, result.response
    assert result.error.kind is ExecErrorKind.MEMORY_LIMIT


# Recursion to the limit in a thread, the error raised again in the main thread.
# ``sorted(key=...)`` is the deepest C stack per level measured (about 2.5 KiB).
RECURSE = textwrap.dedent("""
    import os, threading
    def plain(n):
        return plain(n + 1)
    def through_sorted(n):
        return sorted([n], key=through_sorted)
    class Attr:
        def __getattr__(self, name):
            return getattr(Attr(), name)
    CASES = {"plain": lambda: plain(0), "sorted": lambda: through_sorted(0),
             "getattr": lambda: Attr().x}
    def handle(e, ctx):
        if e.get("pid"):
            return os.getpid()
        caught = []
        def run():
            try:
                CASES[e["case"]]()
            except BaseException as exc:
                caught.append(exc)
        t = threading.Thread(target=run)
        t.start()
        t.join()
        raise caught[0]
""")


@pytest.mark.parametrize("case", ["plain", "sorted", "getattr"])
async def test_recursion_to_the_limit_in_a_thread_is_a_recursion_error(
    executor: ProcessExecutor, make_request: MakeRequest, case: str
) -> None:
    """Unbounded recursion inside a thread, also through C calls, ends at the recursion
    limit as a RecursionError (a script error), not a crash of the worker."""
    host = MemoryHostApi()
    before = body(await executor.execute(make_request(RECURSE, {"pid": True}), host))
    result = await executor.execute(make_request(RECURSE, {"case": case}), host)
    assert result.error is not None, result.response
    assert result.error.kind is ExecErrorKind.UNCAUGHT_EXCEPTION
    assert failure_kind_for(result.error.kind) is InboxFailureKind.SCRIPT_ERROR
    assert result.error.message.startswith("RecursionError: maximum recursion depth")
    after = body(await executor.execute(make_request(RECURSE, {"pid": True}), host))
    assert after == before
