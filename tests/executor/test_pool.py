"""The pool: leasing per app, spares, LRU eviction, recycling, churn, clean shutdown."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from executor_core.executor import ProcessExecutor
from executor_core.memory_host import MemoryHostApi
from picloud_shared.execution import ExecRequest, ExecResult
from picloud_shared.status import ExecErrorKind

from .conftest import new_app, uid_base

MakeRequest = Callable[..., ExecRequest]
pytestmark = pytest.mark.anyio
PID = "import os\ndef handle(e, ctx):\n    return os.getpid()\n"


def pid_of(result: ExecResult) -> int:
    assert result.response is not None, result.error
    value = json.loads(result.response.body)
    assert isinstance(value, int)
    return value


def children() -> set[int]:
    """Live (or zombie) child processes of this test process."""
    me = str(os.getpid())
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == me:
                out.add(int(entry))
    return out


def executor_with(**kw: Any) -> ProcessExecutor:
    kw.setdefault("spare_workers", 0)
    return ProcessExecutor(kw.pop("max_workers", 2), uid_base=uid_base(), **kw)


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 - polling pool state in a test
            await anyio.sleep(0.01)


async def test_worker_is_never_shared_between_apps(make_request: MakeRequest) -> None:
    """Even with one worker slot, a second app gets a fresh process."""
    host = MemoryHostApi()
    async with executor_with(max_workers=1) as ex:
        a1 = pid_of(await ex.execute(make_request(PID, app_id=new_app()), host))
        b = pid_of(await ex.execute(make_request(PID, app_id=new_app()), host))
        assert a1 != b


async def test_warm_worker_is_reused_for_its_app(make_request: MakeRequest) -> None:
    """Sequential calls of one app run in the same warm worker."""
    host = MemoryHostApi()
    async with executor_with() as ex:
        pids = {pid_of(await ex.execute(make_request(PID), host)) for _ in range(5)}
        assert len(pids) == 1


async def test_lru_idle_worker_is_evicted(make_request: MakeRequest) -> None:
    """At capacity, the least recently used idle worker makes room; others stay warm."""
    host = MemoryHostApi()
    a, b, c = new_app(), new_app(), new_app()
    async with executor_with(max_workers=2) as ex:
        pid_a = pid_of(await ex.execute(make_request(PID, app_id=a), host))
        pid_b = pid_of(await ex.execute(make_request(PID, app_id=b), host))
        pid_a2 = pid_of(await ex.execute(make_request(PID, app_id=a), host))  # b is now LRU
        pid_c = pid_of(await ex.execute(make_request(PID, app_id=c), host))
        pid_a3 = pid_of(await ex.execute(make_request(PID, app_id=a), host))
        assert pid_a == pid_a2 == pid_a3
        assert len({pid_a, pid_b, pid_c}) == 3
        assert ex.pool.size <= 2


async def test_new_app_takes_a_prestarted_spare(make_request: MakeRequest) -> None:
    """A new app's first call runs in a spare started beforehand, which is then refilled."""
    host = MemoryHostApi()
    async with executor_with(max_workers=3, spare_workers=1) as ex:
        await wait_for(lambda: len(ex.pool.spare_pids()) == 1)
        (spare,) = ex.pool.spare_pids()
        assert pid_of(await ex.execute(make_request(PID, app_id=new_app()), host)) == spare
        await wait_for(lambda: len(ex.pool.spare_pids()) == 1)
        assert ex.pool.spare_pids() != [spare]


async def test_worker_retired_after_max_executions(make_request: MakeRequest) -> None:
    """After N executions a worker is replaced."""
    host = MemoryHostApi()
    async with executor_with(max_executions_per_worker=2) as ex:
        pids = [pid_of(await ex.execute(make_request(PID), host)) for _ in range(3)]
        assert pids[0] == pids[1] != pids[2]


async def test_idle_worker_retired_after_ttl(make_request: MakeRequest) -> None:
    """An idle worker is stopped after the idle TTL."""
    host = MemoryHostApi()
    async with executor_with(idle_ttl=0.2) as ex:
        first = pid_of(await ex.execute(make_request(PID), host))
        await wait_for(lambda: not ex.pool.idle_workers())
        assert pid_of(await ex.execute(make_request(PID), host)) != first


async def test_higher_memory_limit_gets_a_fresh_worker(make_request: MakeRequest) -> None:
    """A warm worker's address-space limit only goes down; a bigger need gets another."""
    host = MemoryHostApi()
    async with executor_with() as ex:
        small = pid_of(await ex.execute(make_request(PID, memory_limit_mb=32), host))
        again = pid_of(await ex.execute(make_request(PID, memory_limit_mb=16), host))
        big = pid_of(await ex.execute(make_request(PID, memory_limit_mb=256), host))
        assert small == again != big
        grow = "def handle(e, ctx):\n    return len(bytearray(150 << 20))\n"
        result = await ex.execute(make_request(grow, memory_limit_mb=256), host)
        assert result.response is not None, result.error


async def test_cancelled_execution_kills_the_worker(make_request: MakeRequest) -> None:
    """Cancelling execute() propagates and the worker is not reused."""
    host = MemoryHostApi()
    async with executor_with() as ex:
        first = pid_of(await ex.execute(make_request(PID), host))
        sleeper = "import time\ndef handle(e, ctx):\n    time.sleep(30)\n"
        with anyio.move_on_after(0.3):
            await ex.execute(make_request(sleeper), host)
        assert pid_of(await ex.execute(make_request(PID), host)) != first


async def test_non_picloud_host_error_propagates(make_request: MakeRequest) -> None:
    """An unexpected host failure is not the script's: it propagates to the caller."""

    class Broken(MemoryHostApi):
        async def kv_get(self, key: str) -> Any:
            raise ConnectionError("database went away")

    async with executor_with() as ex:
        with pytest.raises(ConnectionError):
            await ex.execute(make_request("def handle(e, ctx):\n    ctx.kv.get('k')\n"), Broken())
        assert pid_of(await ex.execute(make_request(PID), MemoryHostApi())) > 0


async def test_closed_executor_refuses_work(make_request: MakeRequest) -> None:
    """execute() after aclose() raises RuntimeError; aclose is idempotent."""
    ex = executor_with()
    async with ex:
        pass
    await ex.aclose()
    with pytest.raises(RuntimeError):
        await ex.execute(make_request(PID), MemoryHostApi())


async def test_churn_many_apps_leaves_nothing_behind(make_request: MakeRequest) -> None:
    """More apps than workers, concurrently: all succeed, the bound holds, and aclose
    leaves no process, descriptor or scratch dir."""
    fds_before = len(os.listdir("/proc/self/fd"))
    children_before = children()
    apps = [new_app() for _ in range(7)]
    host = MemoryHostApi()
    results: list[ExecResult] = []
    peak = 0
    source = "import time\ndef handle(e, ctx):\n    time.sleep(0.01)\n    return e['i']\n"
    ex = executor_with(max_workers=3, spare_workers=1)
    async with ex:
        root = ex.pool.spec.scratch_root

        async def one(i: int) -> None:
            nonlocal peak
            request = make_request(
                source, {"i": i}, app_id=apps[i % len(apps)], script_id=uuid.UUID(int=1)
            )
            results.append(await ex.execute(request, host))
            peak = max(peak, ex.pool.size)

        async with anyio.create_task_group() as tg:
            for i in range(60):
                tg.start_soon(one, i)
    assert len(results) == 60
    assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]
    assert sorted(json.loads(r.response.body) for r in results if r.response) == list(range(60))
    assert peak <= 3
    assert children() - children_before == set()
    assert len(os.listdir("/proc/self/fd")) == fds_before
    assert not await anyio.Path(root).exists()


async def test_timeout_result_is_classified_and_pool_recovers(make_request: MakeRequest) -> None:
    """A timed-out execution frees its slot; a full pool keeps serving."""
    host = MemoryHostApi()
    async with executor_with(max_workers=1) as ex:
        sleeper = "import time\ndef handle(e, ctx):\n    time.sleep(30)\n"
        result = await ex.execute(make_request(sleeper, timeout_seconds=1), host)
        assert result.error is not None
        assert result.error.kind is ExecErrorKind.TIMEOUT
        assert pid_of(await ex.execute(make_request(PID), host)) > 0


@pytest.mark.skipif(os.geteuid() != 0, reason="uids are only dropped to as root")
async def test_two_executors_never_share_a_worker_uid(make_request: MakeRequest) -> None:
    """Pools on one machine claim disjoint uids, even from the same base."""
    host = MemoryHostApi()
    uid_src = "import os\ndef handle(e, ctx):\n    return os.getuid()\n"
    async with executor_with(max_workers=2) as one, executor_with(max_workers=2) as two:
        uids = set()
        for ex in (one, two):
            for _ in range(2):
                result = await ex.execute(make_request(uid_src, app_id=new_app()), host)
                uids.add(pid_of(result))
        assert len(uids) == 4
        assert 0 not in uids


async def test_one_app_never_holds_every_worker(make_request: MakeRequest) -> None:
    """Three workers; app A starts three slow executions at once: two run, the third
    waits for one of them, and app B, arriving later, runs at once on the third
    worker instead of waiting for A's backlog."""
    slow = "import time\ndef handle(e, ctx):\n    time.sleep(e['s'])\n    return e['s']\n"
    a, b = new_app(), new_app()
    host = MemoryHostApi()
    finished: dict[str, float] = {}
    ex = executor_with(max_workers=3)
    async with ex:
        assert ex.pool.app_share == 2
        started = anyio.current_time()

        async def run(name: str, app: object, seconds: float) -> None:
            result = await ex.execute(make_request(slow, {"s": seconds}, app_id=app), host)
            assert result.ok, result.error
            finished[name] = anyio.current_time() - started

        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(run, f"a{i}", a, 1.0)
            await anyio.sleep(0.3)
            tg.start_soon(run, "b", b, 0.1)
    assert finished["b"] < 1.0  # before any of A's
    assert sorted(v for k, v in finished.items() if k != "b")[-1] >= 2.0  # A's third waited
