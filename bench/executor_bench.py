"""Executor benchmark: warm no-op execution (beside the machine's own floor, a bare
pipe round trip), host-call round trip, cold start, steady traffic, throughput with
more executions in flight than CPUs.

    .venv/bin/python bench/executor_bench.py [--quick]

Not a test: prints figures for bench/RESULTS.md (## Executor).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

import anyio

from executor_core.executor import MIB, ProcessExecutor
from executor_core.memory_host import MemoryHostApi
from executor_core.process import WorkerSpec, spawn
from executor_core.uids import UidClaim
from picloud_shared.execution import ExecRequest
from picloud_shared.ids import AppId, ExecutionId, ScriptId, UserId
from picloud_shared.principals import ALL_CAPABILITIES, Principal

NOOP = "def handle(event, ctx):\n    return None\n"
CALLS = """
import time
def handle(event, ctx):
    ctx.kv.set("k", 1)
    times = []
    for _ in range(event["n"]):
        t = time.perf_counter()
        ctx.kv.get("k")
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]
"""


def request(app: AppId, script: ScriptId, source: str, event: dict | None = None) -> ExecRequest:
    return ExecRequest(
        execution_id=ExecutionId(uuid.uuid4()),
        app_id=app,
        app_name="bench",
        script_id=script,
        script_version=1,
        source=source,
        event=event or {},
        principal=Principal(UserId(uuid.uuid4()), app, ALL_CAPABILITIES),
    )


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def proc_cpu(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def warm_noop(n: int) -> dict[str, float]:
    """Median wall time, plus CPU per execution on each side: what bounds the latency
    on an idle machine (the rest is scheduling and two pipe wake-ups)."""
    app, script, host = AppId(uuid.uuid4()), ScriptId(uuid.uuid4()), MemoryHostApi()
    async with ProcessExecutor(2, spare_workers=1, max_executions_per_worker=10**6) as ex:
        for _ in range(50):
            await ex.execute(request(app, script, NOOP), host)
        (worker,) = ex.pool.idle_workers()
        worker_cpu, host_cpu = proc_cpu(worker.pid), time.process_time()
        times = []
        for _ in range(n):
            req = request(app, script, NOOP)
            t = time.perf_counter()
            await ex.execute(req, host)
            times.append(time.perf_counter() - t)
        host_cpu = time.process_time() - host_cpu
        worker_cpu = proc_cpu(worker.pid) - worker_cpu
    return {
        "median_us": statistics.median(times) * 1e6,
        "p10_us": pct(times, 0.1) * 1e6,
        "p99_us": pct(times, 0.99) * 1e6,
        "host_cpu_us": host_cpu / n * 1e6,
        "worker_cpu_us": worker_cpu / n * 1e6,
    }


PING_CHILD = """
import os
r, w = int(os.environ["R"]), int(os.environ["W"])
os.sched_setaffinity(0, {int(os.environ["CPU"])})
while b := os.read(r, 1):
    os.write(w, b)
"""


def pipe_floor(n: int) -> dict[str, float]:
    """The machine's floor under a warm no-op, measured in the same run: a one-byte
    round trip between this process and a bare child over two pipes, both sides
    blocking in ``read`` on different CPUs (two cross-CPU wake-ups, as a no-op has
    when neither side polls), no other work on either side: what the machine charges
    for the exchange itself at the time of the run, apart from the executor's work."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return {}
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpus[0]})
    down_r, down_w = os.pipe()
    up_r, up_w = os.pipe()
    env = {"R": str(down_r), "W": str(up_w), "CPU": str(cpus[1])}
    child = subprocess.Popen(
        [sys.executable, "-I", "-c", PING_CHILD], pass_fds=(down_r, up_w), env=env
    )
    os.close(down_r)
    os.close(up_w)
    try:
        times = []
        for i in range(n + 200):
            t = time.perf_counter()
            os.write(down_w, b"x")
            os.read(up_r, 1)
            if i >= 200:  # the child's start-up and first wake-ups are not the floor
                times.append(time.perf_counter() - t)
    finally:
        os.close(down_w)
        child.wait()
        os.close(up_r)
        os.sched_setaffinity(0, mine)
    return {"median_us": statistics.median(times) * 1e6, "p10_us": pct(times, 0.1) * 1e6}


async def host_call(n: int) -> dict[str, float]:
    app, script, host = AppId(uuid.uuid4()), ScriptId(uuid.uuid4()), MemoryHostApi()
    async with ProcessExecutor(2, spare_workers=0) as ex:
        await ex.execute(request(app, script, CALLS, {"n": 10}), host)
        result = await ex.execute(request(app, script, CALLS, {"n": n}), host)
    assert result.response is not None, result.error
    return {"median_us_seen_by_script": json.loads(result.response.body) * 1e6}


async def cold_start(n: int) -> dict[str, float]:
    claim = UidClaim(61000, 1) if os.geteuid() == 0 else None
    root = tempfile.mkdtemp(prefix="picloud-exec-bench-")
    os.chmod(root, 0o711)
    spec = WorkerSpec(
        scratch_root=root,
        address_space=2112 * MIB,
        cpu_lifetime=3600,
        file_size=16 * MIB,
        uids=claim.uids if claim else None,
    )
    times = []
    for _ in range(n):
        t = time.perf_counter()
        worker = await spawn(spec, 0)
        times.append(time.perf_counter() - t)
        await worker.reap()
    os.rmdir(root)
    if claim:
        claim.release()
    return {"median_ms": statistics.median(times) * 1e3, "p90_ms": pct(times, 0.9) * 1e3}


async def steady(n: int) -> dict[str, float]:
    """One warm app at a steady pace while workers retire every 100 executions."""
    app, script, host = AppId(uuid.uuid4()), ScriptId(uuid.uuid4()), MemoryHostApi()
    async with ProcessExecutor(3, spare_workers=1, max_executions_per_worker=100) as ex:
        await ex.execute(request(app, script, NOOP), host)
        await anyio.sleep(0.5)
        times = []
        for _ in range(n):
            t = time.perf_counter()
            await ex.execute(request(app, script, NOOP), host)
            times.append(time.perf_counter() - t)
            await anyio.sleep(0.002)  # steady, not saturating: spares get refilled
        cold = ex.pool.cold_leases
    return {
        "median_us": statistics.median(times) * 1e6,
        "p99_us": pct(times, 0.99) * 1e6,
        "max_ms": max(times) * 1e3,
        "cold_leases_after_warmup": cold - 1,
    }


async def concurrent(n: int, apps: int = 4) -> dict[str, float]:
    """Throughput with more executions in flight than CPUs, where nobody should poll:
    one caller per app, each a loop of a script making one host call, one warm
    worker per app (no eviction, no spawn)."""
    host = MemoryHostApi()
    script = ScriptId(uuid.uuid4())
    source = "def handle(event, ctx):\n    return ctx.kv.get('k')\n"
    app_ids = [AppId(uuid.uuid4()) for _ in range(apps)]
    times: list[float] = []
    async with ProcessExecutor(apps, spare_workers=0, max_executions_per_worker=10**6) as ex:
        for app in app_ids:
            await ex.execute(request(app, script, source), host)
        spawned = ex.pool.spawned

        async def caller(app: AppId) -> None:
            for _ in range(n // apps):
                req = request(app, script, source)
                t = time.perf_counter()
                await ex.execute(req, host)
                times.append(time.perf_counter() - t)

        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for app in app_ids:
                tg.start_soon(caller, app)
        elapsed = time.perf_counter() - started
        assert ex.pool.spawned == spawned, "a worker was replaced during the run"
    return {
        "executions_per_s": len(times) / elapsed,
        "median_us": statistics.median(times) * 1e6,
        "p99_us": pct(times, 0.99) * 1e6,
    }


async def main(quick: bool) -> None:
    k = 5 if quick else 1
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, "
        f"load {os.getloadavg()[0]:.2f}, uid {os.geteuid()}"
    )
    print("pipe round trip floor:", pipe_floor(5000 // k))
    print("warm no-op execution :", await warm_noop(5000 // k))
    print("host call round trip :", await host_call(5000 // k))
    print("cold worker start    :", await cold_start(30 // k))
    print("steady warm traffic  :", await steady(2000 // k))
    print("4 apps concurrently  :", await concurrent(8000 // k))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    anyio.run(main, parser.parse_args().quick)
