"""Paired probe of ``executor_core.process.READ_SIZE`` (session 11): a warm no-op's
host CPU and median latency with 256 KiB reads (the old size) and 64 KiB reads,
alternating in one executor, 8 rounds of 3000 executions.

    nice -n -15 .venv/bin/python bench/read_size_probe.py --poll off
    nice -n -15 .venv/bin/python bench/read_size_probe.py --poll on

Not a test: prints figures for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path

import anyio

import executor_core.process as process
from executor_core.executor import ProcessExecutor
from executor_core.memory_host import MemoryHostApi
from picloud_shared.ids import AppId, ScriptId

sys.path.insert(0, str(Path(__file__).parent))
import executor_bench as eb  # the bench's own request builder

SIZES = (1 << 18, 1 << 16)
N = 3000


async def main(poll: bool, rounds: int) -> None:
    app, script, host = AppId(uuid.uuid4()), ScriptId(uuid.uuid4()), MemoryHostApi()
    figures: dict[int, list[tuple[float, float]]] = {size: [] for size in SIZES}
    async with ProcessExecutor(
        2, spare_workers=1, max_executions_per_worker=10**6, busy_poll=poll
    ) as ex:
        for _ in range(50):
            await ex.execute(eb.request(app, script, eb.NOOP), host)
        for i in range(rounds):
            size = SIZES[i % 2]
            process.READ_SIZE = size
            requests = [eb.request(app, script, eb.NOOP) for _ in range(N)]
            cpu, times = time.process_time(), []
            for request in requests:
                t = time.perf_counter()
                await ex.execute(request, host)
                times.append(time.perf_counter() - t)
            cpu_us = (time.process_time() - cpu) / N * 1e6
            figures[size].append((cpu_us, statistics.median(times) * 1e6))
    for size, runs in figures.items():
        print(
            f"poll={'on' if poll else 'off'} read={size >> 10} KiB:"
            f" host CPU µs {[round(c) for c, _ in runs]},"
            f" median µs {[round(m) for _, m in runs]}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--poll", choices=["on", "off"], default="off")
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    anyio.run(main, args.poll == "on", args.rounds)
