"""Probe: what several executions in flight per worker would save (issue 5's lever).

Not a benchmark of picloud as it is: ``ProcessExecutor`` runs one execution per
worker at a time. This drives warm workers of one app over the raw frame protocol
(``WorkerProcess.send``/``recv``, no pool bookkeeping, no host calls), keeping
``depth`` no-op ``exec`` frames queued in each worker's pipe: a worker that finds
its next frame already there needs no wake-up (on this VM a wake-up costs ~25 µs
of the writer's CPU). Prints executions/s and CPU per execution on each side for
each depth, interleaved.

    .venv/bin/python bench/worker_pipelining_probe.py [--n 16000] [--workers 8]
"""

from __future__ import annotations

import argparse
import os
import time
import uuid
from typing import Any

import anyio
from executor_bench import NOOP, proc_cpu, request

from executor_core.executor import ProcessExecutor
from executor_core.memory_host import MemoryHostApi
from executor_core.process import WorkerProcess
from picloud_shared.ids import AppId, ScriptId


async def drain(depth: int, n: int, workers: int) -> dict[str, float]:
    host, script, app = MemoryHostApi(), ScriptId(uuid.uuid4()), AppId(uuid.uuid4())
    async with ProcessExecutor(
        workers, spare_workers=0, max_executions_per_worker=10**6, busy_poll=False
    ) as ex:
        async with anyio.create_task_group() as tg:  # one warm worker each, script compiled
            for _ in range(workers):
                tg.start_soon(ex.execute, request(app, script, NOOP), host)
        warm = list(ex.pool.idle_workers())
        key = f"{script}@1"

        def frame() -> dict[str, Any]:
            req = request(app, script, NOOP)
            ctx = req.context_wire()
            return {"t": "exec", "n": os.urandom(8).hex(), "key": key, "ev": {}, "ctx": ctx,
                    "cpu": 10, "s": 0}  # fmt: skip

        per = n // len(warm)

        async def drive(worker: WorkerProcess) -> None:
            sent = done = 0
            while sent < min(depth, per):
                await worker.send(frame())
                sent += 1
            while done < per:
                answer = await worker.recv()
                if answer.get("t") != "done" or answer.get("ok") is not True:
                    raise RuntimeError(f"unexpected answer {answer!r}")
                done += 1
                if sent < per:
                    await worker.send(frame())
                    sent += 1

        worker_cpu = sum(proc_cpu(w.pid) for w in warm)
        host_cpu, started = time.process_time(), time.perf_counter()
        async with anyio.create_task_group() as tg:
            for worker in warm:
                tg.start_soon(drive, worker)
        elapsed = time.perf_counter() - started
        total = per * len(warm)
        return {
            "executions_per_s": total / elapsed,
            "host_cpu_us": 1e6 * (time.process_time() - host_cpu) / total,
            "worker_cpu_us": 1e6 * (sum(proc_cpu(w.pid) for w in warm) - worker_cpu) / total,
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=16000)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    for _ in range(args.rounds):
        for depth in (1, 2, 4):
            r = anyio.run(drain, depth, args.n, args.workers)
            print(f"depth {depth}: " + ", ".join(f"{k} {v:.0f}" for k, v in r.items()), flush=True)


if __name__ == "__main__":
    main()
