"""Busy-polling the pipes: when each side polls instead of sleeping, and that frames
arrive intact whichever way they are waited for. Behaviour only, never speed."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from executor_core import frames, polling
from executor_core.executor import ProcessExecutor
from executor_core.memory_host import MemoryHostApi
from executor_core.process import WorkerProcess
from executor_core.script_api import NEXT_EXEC, REPLY, Channel
from picloud_shared.execution import ExecRequest, ExecResult
from picloud_shared.status import ExecErrorKind

from .conftest import new_app, uid_base

MakeRequest = Callable[..., ExecRequest]
pytestmark = pytest.mark.anyio
MULTI_CPU = len(os.sched_getaffinity(0)) > 1
# What the worker was last told: its polling window (seconds) after the exec frame
# or after a host call's reply.
WINDOW = "def handle(e, ctx):\n    return ctx._ch.spin\n"
WINDOW_AFTER_CALL = "def handle(e, ctx):\n    ctx.kv.get('k')\n    return ctx._ch.spin\n"


def value(result: ExecResult) -> Any:
    assert result.response is not None, result.error
    return json.loads(result.response.body)


@pytest.fixture
def pipe() -> Any:
    r, w = os.pipe()
    yield r, w
    for fd in (r, w):
        with contextlib.suppress(OSError):
            os.close(fd)


def polling_channel(rfd: int) -> Channel:
    channel = Channel(rfd, -1)
    channel.set_spin({"s": 200})
    return channel


def write_later(fd: int, data: bytes, delay: float) -> threading.Thread:
    def run() -> None:
        time.sleep(delay)
        os.write(fd, data)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


# --- the worker's side --------------------------------------------------------------


def test_polling_window_comes_from_the_host_and_is_bounded() -> None:
    """Only an int of µs in (0, 1000] opens a window; anything else means sleep."""
    channel = Channel(-1, -1)
    for s, expected in [(200, 200e-6), (1000, 1e-3), (0, 0.0), (5000, 0.0), (-1, 0.0)]:
        channel.set_spin({"s": s})
        assert channel.spin == pytest.approx(expected)
    for bad in ["200", 200.0, True, None]:
        channel.set_spin({"s": bad})
        assert channel.spin == 0.0
    channel.set_spin({})
    assert not channel.will_spin(REPLY)
    assert not channel.will_spin(NEXT_EXEC)


def test_frames_arrive_whether_polled_or_slept_for(pipe: tuple[int, int]) -> None:
    """Already buffered, arriving in pieces, arriving after the window: same frames."""
    r, w = pipe
    channel = polling_channel(r)
    one, two = {"t": "ret", "id": 1, "v": "x" * 100}, {"t": "ret", "id": 2, "v": [1, 2]}
    os.write(w, frames.encode(one) + frames.encode(two))
    assert channel.read_frame() == one
    assert channel.read_frame() == two
    data = frames.encode({"t": "exec", "v": "y" * 70_000})  # more than one read
    os.write(w, data[:3])
    thread = write_later(w, data[3:], 0.05)  # long after the polling window
    assert channel.read_frame(NEXT_EXEC) == {"t": "exec", "v": "y" * 70_000}
    thread.join()
    os.write(w, frames.encode(one))
    assert channel.read_frame() == one


def test_end_of_file_while_polling_is_end_of_file(pipe: tuple[int, int]) -> None:
    r, w = pipe
    channel = polling_channel(r)
    os.close(w)
    assert channel.read_frame() is None


def test_a_slow_answer_stops_polling_for_that_kind_of_wait(pipe: tuple[int, int]) -> None:
    """The host's send time (``ts``) tells how long it took; past the polling window
    the next wait of that kind sleeps at once, the other kind is unaffected; a quick
    answer turns polling back on."""
    r, w = pipe
    channel = polling_channel(r)
    assert channel.will_spin(REPLY)
    assert channel.will_spin(NEXT_EXEC)
    late = time.perf_counter() + 100 * channel.spin  # as if sent long after the wait began
    thread = write_later(w, frames.encode({"t": "ret", "id": 1, "ts": late}), 0.01)
    channel.read_frame(REPLY)
    thread.join()
    assert not channel.will_spin(REPLY)
    assert channel.will_spin(NEXT_EXEC)
    thread = write_later(w, frames.encode({"t": "ret", "id": 2, "ts": 0.0}), 0.01)
    channel.read_frame(REPLY)  # answered "at once" (ts before the wait began)
    thread.join()
    assert channel.will_spin(REPLY)


# --- the host's side ----------------------------------------------------------------


def executor_with(max_workers: int = 2, **kw: Any) -> ProcessExecutor:
    return ProcessExecutor(max_workers, spare_workers=0, uid_base=uid_base(), **kw)


@pytest.fixture
def run_queue(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Callable[[int], None]:
    """Pretend the machine has this many runnable tasks (the test suite's own load
    must not decide what these tests see)."""
    path = tmp_path / "loadavg"

    def runnable(n: int) -> None:
        path.write_text(f"0.50 0.40 0.30 {n}/300 12345\n")

    runnable(1)
    monkeypatch.setattr(polling, "RUNQUEUE", str(path))
    return runnable


async def test_a_lone_execution_lets_its_worker_poll(
    make_request: MakeRequest, run_queue: Callable[[int], None]
) -> None:
    """One execution at a time on an otherwise idle multi-CPU machine: the worker
    gets a window, in the exec frame and in every reply; on one CPU polling could
    only steal it."""
    host = MemoryHostApi()
    expected = polling.WORKER_SPIN_US / 1e6 if MULTI_CPU else 0.0
    async with executor_with() as ex:
        for source in (WINDOW, WINDOW_AFTER_CALL, WINDOW):
            assert value(await ex.execute(make_request(source), host)) == pytest.approx(expected)


async def test_a_busy_machine_sleeps_instead_of_polling(
    make_request: MakeRequest, run_queue: Callable[[int], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Other runnable tasks on the machine, or busy_poll=False: no window; when the
    other tasks are gone, the window comes back."""
    monkeypatch.setattr(polling, "RUNQUEUE_EVERY", 0.0)  # sample every time
    host = MemoryHostApi()
    run_queue(len(os.sched_getaffinity(0)) + 1)
    async with executor_with() as ex:
        for source in (WINDOW, WINDOW_AFTER_CALL):
            assert value(await ex.execute(make_request(source), host)) == 0.0
        run_queue(1)
        expected = polling.WORKER_SPIN_US / 1e6 if MULTI_CPU else 0.0
        assert value(await ex.execute(make_request(WINDOW), host)) == pytest.approx(expected)
    async with executor_with(busy_poll=False) as ex:
        for source in (WINDOW, WINDOW_AFTER_CALL):
            assert value(await ex.execute(make_request(source), host)) == 0.0


async def test_competing_executions_sleep_instead_of_polling(
    make_request: MakeRequest, run_queue: Callable[[int], None]
) -> None:
    """With as many executions in flight as CPUs, every reply tells the workers to
    sleep (a polling worker would take a CPU another execution needs)."""
    n = len(os.sched_getaffinity(0)) + 1
    arrived = 0
    everyone_in = anyio.Event()

    class Barrier(MemoryHostApi):
        async def kv_get(self, key: str) -> Any:
            nonlocal arrived
            arrived += 1
            if arrived == n:
                everyone_in.set()
            await everyone_in.wait()
            return None

    host = Barrier()
    results: list[ExecResult] = []

    async def one() -> None:
        results.append(await ex.execute(make_request(WINDOW_AFTER_CALL, app_id=new_app()), host))

    async with executor_with(max_workers=n) as ex:
        with anyio.fail_after(60):  # a hang guard, not a measurement
            async with anyio.create_task_group() as tg:
                for _ in range(n):
                    tg.start_soon(one)
        assert [value(r) for r in results] == [0.0] * n
        # Alone again: the window comes back.
        lone = value(await ex.execute(make_request(WINDOW_AFTER_CALL), MemoryHostApi()))
        assert lone == (polling.WORKER_SPIN_US / 1e6 if MULTI_CPU else 0.0)


async def test_answers_after_the_hosts_poll_are_still_served(make_request: MakeRequest) -> None:
    """Quick executions (the host polls for them) then slow ones (the poll misses and
    the host waits on the event loop): every result arrives, calls and logs too."""
    host = MemoryHostApi()
    quick = "def handle(e, ctx):\n    ctx.kv.set('k', e['i'])\n    return ctx.kv.get('k')\n"
    slow = (
        "import time\n"
        "def handle(e, ctx):\n"
        "    time.sleep(0.02)\n"
        "    print('slept', e['i'])\n"
        "    v = ctx.kv.get('k')\n"
        "    time.sleep(0.02)\n"
        "    return v\n"
    )
    async with executor_with() as ex:
        for i in range(30):
            assert value(await ex.execute(make_request(quick, {"i": i}), host)) == i
        for i in range(3):
            result = await ex.execute(make_request(slow, {"i": i}), host)
            assert value(result) == 29
            assert result.logs == (f"slept {i}",)
        for i in range(5):
            assert value(await ex.execute(make_request(quick, {"i": i}), host)) == i


@pytest.mark.parametrize("stuck", ["kv_get", "log"])
async def test_a_host_await_past_the_deadline_times_out(
    make_request: MakeRequest, stuck: str
) -> None:
    """The deadline covers the host's side too: a host call or log line that never
    returns ends the execution as a timeout, and the worker is replaced."""

    class Stuck(MemoryHostApi):
        async def kv_get(self, key: str) -> Any:
            await anyio.sleep_forever()

        async def log(self, line: str) -> None:
            await anyio.sleep_forever()

    source = (
        "import os\n"
        "def handle(e, ctx):\n"
        "    if e.get('stuck') == 'log':\n"
        "        print('hello')\n"
        "    elif e.get('stuck'):\n"
        "        ctx.kv.get('k')\n"
        "    return os.getpid()\n"
    )
    async with executor_with() as ex:
        first = value(await ex.execute(make_request(source), MemoryHostApi()))
        with anyio.fail_after(30):  # a hang guard, not a measurement
            request = make_request(source, {"stuck": stuck}, timeout_seconds=1)
            result = await ex.execute(request, Stuck())
        assert result.error is not None
        assert result.error.kind is ExecErrorKind.TIMEOUT
        assert value(await ex.execute(make_request(source), MemoryHostApi())) != first


async def test_the_portable_path_without_an_asyncio_reader(
    make_request: MakeRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Off asyncio (no reader callback, no loop timer: anyio waits and one cancel scope
    for the deadline) the results are the same, timeouts included."""
    monkeypatch.setattr(WorkerProcess, "watch", lambda self: None)
    host = MemoryHostApi()
    calls = (
        "def handle(e, ctx):\n"
        "    ctx.kv.set('k', 41)\n"
        "    print('hi')\n"
        "    return ctx.kv.get('k') + 1\n"
    )
    sleeper = "import time\ndef handle(e, ctx):\n    time.sleep(30)\n"
    async with executor_with() as ex:
        for _ in range(3):
            result = await ex.execute(make_request(calls), host)
            assert value(result) == 42
            assert result.logs == ("hi",)
        result = await ex.execute(make_request(sleeper, timeout_seconds=1), host)
        assert result.error is not None
        assert result.error.kind is ExecErrorKind.TIMEOUT
        assert value(await ex.execute(make_request(calls), host)) == 42
