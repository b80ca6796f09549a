"""When the host and its workers busy-poll their pipes instead of sleeping on them."""

from __future__ import annotations

import contextlib
import math
import os
import time
from typing import Any

from executor_core.process import WorkerProcess

# A sleeping process costs a wake-up (tens to hundreds of µs on a VM) that a polling
# one does not. The rules:
# * Nobody polls unless the host and every execution in flight can each have a CPU
#   no other task wants: fewer executions in flight than CPUs, and the machine's
#   other runnable tasks (RUNQUEUE, sampled every RUNQUEUE_EVERY) fit in the rest.
#   On a busy machine a wake-up is cheap (no idle CPU to wake) and a poll would
#   only take a CPU from someone else.
# * Workers poll for up to WORKER_SPIN_US (the window travels in every host frame),
#   and only if polling would have caught the same kind of wait last time
#   (script_api.Channel): sparse traffic and slow host calls sleep at once.
# * The host polls (blocking the event loop, at most HOST_SPIN) only when it runs a
#   single execution, the worker said it is awake (a log frame, or ``sp`` on the
#   frame before its wait, within half its window) and it answered the host's
#   previous frame within HOST_SPIN.
# Both sides judge how long the other took from its send time carried in the frame
# (``ts``; perf_counter is CLOCK_MONOTONIC, one clock for all processes): their own
# clocks would include the wake-up that polling is there to save. Every empty poll
# yields the CPU (sched_yield): the scheduler often puts a worker on its host's CPU.
_CPUS = len(os.sched_getaffinity(0))
HOST_SPIN = 80e-6  # seconds
WORKER_SPIN_US = 200  # µs
_AWAKE_FOR = WORKER_SPIN_US / 2e6  # seconds after a frame the worker surely still polls
RUNQUEUE = "/proc/loadavg"  # its fourth field: runnable tasks / all tasks
RUNQUEUE_EVERY = 1e-3  # seconds


class RunQueue:
    """How many runnable tasks on the machine are not ours, sampled at most every
    RUNQUEUE_EVERY (one ``pread`` of RUNQUEUE); 0 where it cannot be read."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self._at = -math.inf
        self._others = 0

    def open(self) -> None:
        with contextlib.suppress(OSError):
            self._fd = os.open(RUNQUEUE, os.O_RDONLY | os.O_CLOEXEC)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def others(self, ours: int) -> int:
        """``ours``: how many of the runnable tasks are the caller's right now."""
        now = time.perf_counter()
        if self._fd is not None and now - self._at >= RUNQUEUE_EVERY:
            self._at = now
            try:
                data = os.pread(self._fd, 128, 0)
                slash = data.index(b"/")
                runnable = int(data[data.rindex(b" ", 0, slash) + 1 : slash])
            except (OSError, ValueError):
                return self._others
            self._others = max(0, runnable - ours)
        return self._others


class Polling:
    """Applies the rules above for one executor; ``enabled=False`` never polls."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and _CPUS > 1
        self._run_queue = RunQueue()

    def open(self) -> None:
        self._run_queue.open()

    def close(self) -> None:
        self._run_queue.close()

    def observe(self, worker: WorkerProcess, frame: dict[str, Any]) -> None:
        """What a frame just received tells about the worker's polling."""
        now, sent = time.perf_counter(), frame.get("ts")
        worker.answered_in = (sent if type(sent) is float else now) - worker.sent_at
        awake = frame.get("t") == "log" or frame.get("sp") is True
        worker.polls_until = now + _AWAKE_FOR if awake else 0.0

    def _cpus_to_spare(self, worker: WorkerProcess, in_flight: int) -> bool:
        """Whether the host and every execution in flight can poll on a CPU of their
        own, with the machine's other runnable tasks on the remaining ones."""
        if not self.enabled or in_flight >= _CPUS:
            return False
        ours = 1 + int(time.perf_counter() < worker.polls_until)  # the host, a polling worker
        return 1 + in_flight + self._run_queue.others(ours) <= _CPUS

    def worker_spin(self, worker: WorkerProcess, in_flight: int) -> int:
        """The polling window (µs) for the worker's next wait."""
        return WORKER_SPIN_US if self._cpus_to_spare(worker, in_flight) else 0

    def host_spin(self, worker: WorkerProcess, in_flight: int) -> float:
        """How long to busy-poll for the worker's next frame before yielding."""
        if (
            in_flight == 1
            and worker.answered_in <= HOST_SPIN
            and time.perf_counter() < worker.polls_until
            and self._cpus_to_spare(worker, in_flight)
        ):
            return HOST_SPIN
        return 0.0
