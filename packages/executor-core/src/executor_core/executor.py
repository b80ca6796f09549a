"""``ProcessExecutor``: the default :class:`~picloud_shared.ports.Executor`.

Runs each request in a sandboxed worker process leased from a :class:`WorkerPool`,
serves its host calls through a :class:`HostBridge`, enforces the wall-clock
deadline (the worker's process group is killed and replaced), caps logs and the
response, and classifies every outcome into an :class:`ExecResult`.

Memory: a worker's ``RLIMIT_AS`` is the script's ``memory_limit_mb`` plus
``INTERPRETER_ALLOWANCE_MB`` (the interpreter, its imports and thread stacks
need about 15-30 MiB of address space before a script allocates anything).
Workers start at the largest limit and only ever lower it per execution; a
request needing more than a warm worker still allows gets another worker.
CPU: ``RLIMIT_CPU`` is set per execution to the CPU time used so far plus the
script's ``timeout_seconds`` (SIGXCPU → ``cpu_limit``).
Latency: while CPUs are free, host and worker busy-poll the pipes for a bounded
time instead of sleeping on them (a wake-up costs tens to hundreds of µs on a VM);
the rules are with ``HOST_SPIN`` below, ``busy_poll=False`` turns it off.

Usage::

    async with ProcessExecutor(max_workers=8) as executor:
        result = await executor.execute(request, host)
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import signal
import tempfile
import time
from typing import TYPE_CHECKING, Any, Self

import anyio

from executor_core.host_bridge import OPS, HostBridge
from executor_core.pool import WorkerPool
from executor_core.process import WorkerGone, WorkerProcess, WorkerSpec
from executor_core.uids import UidClaim
from picloud_shared.execution import ExecError, ExecResult, ScriptResponse
from picloud_shared.limits import (
    MAX_LOG_BYTES,
    MAX_MEMORY_LIMIT_MB,
    MAX_RESPONSE_BYTES,
    MAX_TIMEOUT_SECONDS,
)
from picloud_shared.status import ExecErrorKind as K
from picloud_shared.wire import WireError

if TYPE_CHECKING:
    from types import TracebackType

    from picloud_shared.execution import ExecRequest
    from picloud_shared.ports import HostApi

log = logging.getLogger(__name__)

MIB = 1024 * 1024
INTERPRETER_ALLOWANCE_MB = 64
DEFAULT_FILE_SIZE_LIMIT = 16 * MIB
CPU_LIFETIME_SECONDS = 3600
MAX_MESSAGE_CHARS = 2000
MAX_TRACEBACK_CHARS = 16000

# What a worker may report itself; anything else is a protocol violation.
_WORKER_KINDS = frozenset(
    {
        K.REJECTED,
        K.SYNTAX_ERROR,
        K.MISSING_HANDLER,
        K.UNCAUGHT_EXCEPTION,
        K.INVALID_RETURN,
        K.CPU_LIMIT,
        K.MEMORY_LIMIT,
        K.FILE_SIZE_LIMIT,
        K.OUTPUT_LIMIT,
        K.INTERNAL,
    }
)
# After these the worker is not reused.
_RECYCLE = frozenset(
    {
        K.TIMEOUT,
        K.CPU_LIMIT,
        K.MEMORY_LIMIT,
        K.FILE_SIZE_LIMIT,
        K.OUTPUT_LIMIT,
        K.WORKER_CRASH,
        K.PROTOCOL_VIOLATION,
        K.INTERNAL,
    }
)
_DONE_KEYS = frozenset(
    {"t", "n", "ok", "resp", "kind", "msg", "tb", "cached", "has", "cpu", "sp", "ts"}
)
_CALL_KEYS = frozenset({"t", "n", "id", "op", "a", "sp", "ts"})
_LOG_KEYS = frozenset({"t", "n", "line"})
_logged_missing: set[str] = set()

# Busy-polling the pipes instead of sleeping on them: a sleeping process costs a
# wake-up (tens to hundreds of µs on a VM) that a polling one does not.
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


class _RunQueue:
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


class _Violation(Exception):
    """The worker sent something it must not."""


class _TimedOut(Exception):
    """The deadline passed once the host was involved (its cancel scope caught it)."""


class _Serving:
    """One execution's exchange with its worker, as ``ProcessExecutor._serve`` goes."""

    __slots__ = ("bridge", "host", "key", "log_bytes", "logs", "nonce", "result", "worker")

    def __init__(
        self, worker: WorkerProcess, nonce: str, key: str, host: HostApi, logs: list[str]
    ) -> None:
        self.worker = worker
        self.nonce = nonce
        self.key = key
        self.host = host
        self.logs = logs
        self.log_bytes = 0
        self.bridge: HostBridge | None = None
        self.result: tuple[ScriptResponse | None, ExecError | None] | None = None


class _Failed(Exception):
    def __init__(self, kind: K, message: str) -> None:
        super().__init__(message)
        self.kind = kind


SCRATCH_PREFIX = "picloud-exec-"
OWNER_FILE = "owner.pid"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_scratch_roots(parent: str | None = None) -> int:
    """Remove scratch roots left by executors whose process died without cleaning up
    (SIGKILL, power loss). A root without a readable owner pid is left alone."""
    base = parent or tempfile.gettempdir()
    removed = 0
    for entry in os.scandir(base):
        if not (entry.name.startswith(SCRATCH_PREFIX) and entry.is_dir(follow_symlinks=False)):
            continue
        try:
            with open(os.path.join(entry.path, OWNER_FILE)) as owner:
                pid = int(owner.read().strip())
        except (OSError, ValueError):
            continue
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed += 1
    return removed


def make_scratch_root(parent: str | None = None) -> str:
    """Sweep stale roots, then make this executor's own, owned by this process."""
    sweep_stale_scratch_roots(parent)
    root = tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=parent)
    os.chmod(root, 0o711)  # slot uids traverse into their own 0700 dirs
    with open(os.path.join(root, OWNER_FILE), "w") as owner:
        owner.write(str(os.getpid()))
    return root


def _is_root() -> bool:
    return os.geteuid() == 0


class ProcessExecutor:
    """Sandboxed worker processes, leased per app. See the module docstring."""

    def __init__(
        self,
        max_workers: int = 8,
        *,
        spare_workers: int = 1,
        max_executions_per_worker: int = 1000,
        idle_ttl: float = 300.0,
        uid_base: int | None = 61000,  # first uid tried; claimed machine-wide (uids.py)
        scratch_root: str | None = None,
        file_size_limit: int = DEFAULT_FILE_SIZE_LIMIT,
        busy_poll: bool = True,  # poll the pipes briefly while CPUs are free (module notes)
    ) -> None:
        self._scratch_parent = scratch_root
        self._uid_base = uid_base if _is_root() else None
        self._file_size_limit = file_size_limit
        self._max_executions = max_executions_per_worker
        self._pool_args = dict(max_workers=max_workers, spares=spare_workers, idle_ttl=idle_ttl)
        self._pool: WorkerPool | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._closed = False
        self._in_flight = 0  # executions running in a worker now
        self._may_poll = busy_poll and _CPUS > 1
        self._run_queue = _RunQueue()
        self.compiles = 0
        self.cache_hits = 0

    @property
    def pool(self) -> WorkerPool:
        if self._pool is None:
            raise RuntimeError("the executor is not started (use `async with`)")
        return self._pool

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Create the scratch root and start the pool's background tasks."""
        if self._closed or self._pool is not None:
            raise RuntimeError("an executor starts once")
        max_workers = self._pool_args["max_workers"]
        claim = None
        if self._uid_base is not None:
            claim = await anyio.to_thread.run_sync(UidClaim, self._uid_base, max_workers)
        root = await anyio.to_thread.run_sync(make_scratch_root, self._scratch_parent)
        spec = WorkerSpec(
            scratch_root=root,
            address_space=(MAX_MEMORY_LIMIT_MB + INTERPRETER_ALLOWANCE_MB) * MIB,
            cpu_lifetime=CPU_LIFETIME_SECONDS,
            file_size=self._file_size_limit,
            uids=claim.uids if claim else None,
        )
        self._pool = WorkerPool(spec, **self._pool_args)  # type: ignore[arg-type]
        stack = contextlib.AsyncExitStack()
        if claim is not None:
            stack.callback(claim.release)
        stack.callback(shutil.rmtree, root, True)
        if self._may_poll:
            self._run_queue.open()
            stack.callback(self._run_queue.close)
        tg = await stack.enter_async_context(anyio.create_task_group())
        stack.push_async_callback(self._pool.aclose)
        stack.callback(tg.cancel_scope.cancel)
        self._pool.start(tg)
        self._stack = stack
        if self._uid_base is None:
            _log_missing("uid_drop", "not running as root: workers keep the server's uid")

    async def aclose(self) -> None:
        self._closed = True
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()

    # --- execution --------------------------------------------------------------

    async def execute(self, request: ExecRequest, host: HostApi) -> ExecResult:
        if self._closed:
            raise RuntimeError("the executor is closed")
        started = time.perf_counter()
        address_space = (request.memory_limit_mb + INTERPRETER_ALLOWANCE_MB) * MIB
        pool = self.pool
        worker = await pool.acquire(request.app_id, address_space)
        _note_layers(worker.layers)
        logs: list[str] = []
        self._in_flight += 1
        try:
            response, error = await self._run(worker, request, host, address_space, logs)
        except BaseException:
            pool.release(worker, reuse=False)
            raise
        finally:
            self._in_flight -= 1
        worker.executions += 1
        reuse = (
            (error is None or error.kind not in _RECYCLE)
            and worker.executions < self._max_executions
            and worker.cpu < CPU_LIFETIME_SECONDS - MAX_TIMEOUT_SECONDS - 10
        )
        pool.release(worker, reuse=reuse)
        duration = (time.perf_counter() - started) * 1000
        if error is not None:
            return ExecResult.failed(request.execution_id, error, tuple(logs), duration)
        assert response is not None
        return ExecResult.succeeded(request.execution_id, response, tuple(logs), duration)

    async def _run(
        self,
        worker: WorkerProcess,
        request: ExecRequest,
        host: HostApi,
        address_space: int,
        logs: list[str],
    ) -> tuple[ScriptResponse | None, ExecError | None]:
        key = f"{request.script_id}@{request.script_version}"
        message: dict[str, Any] = {
            "t": "exec",
            "n": os.urandom(8).hex(),
            "key": key,
            "ev": request.event,
            "ctx": request.context_wire(),
            "cpu": request.timeout_seconds,
            "s": self._worker_spin(worker),
        }
        if key not in worker.scripts:
            message["src"] = request.source
        if address_space < worker.address_space:
            message["mem"] = address_space
            worker.address_space = address_space
        timeout = request.timeout_seconds
        loop = worker.loop
        if loop is None:  # not on asyncio: one cancel scope over the whole exchange
            with anyio.move_on_after(timeout):
                return await self._exchange(worker, message, host, logs, math.inf)
            worker.kill()
            return None, _timed_out(timeout)
        # On asyncio the deadline is a plain timer that kills the worker and wakes
        # its reader; only awaits on the host get a cancel scope (to the same deadline).
        deadline = loop.time() + timeout
        timer = loop.call_at(deadline, worker.expire)
        try:
            return await self._exchange(worker, message, host, logs, deadline)
        finally:
            timer.cancel()

    async def _exchange(
        self,
        worker: WorkerProcess,
        message: dict[str, Any],
        host: HostApi,
        logs: list[str],
        deadline: float,  # loop time; inf when an outer cancel scope has it
    ) -> tuple[ScriptResponse | None, ExecError | None]:
        """Send ``exec``, serve the worker's frames until ``done``, classify."""
        run = _Serving(worker, message["n"], message["key"], host, logs)
        try:
            try:
                await worker.send(message)
            except (TypeError, ValueError) as exc:
                return None, ExecError(K.INTERNAL, f"the event is not JSON: {exc}")
            needs_host = await self._serve(run, None)
            if needs_host is not None:
                # From the first call or log line on, the host is awaited: the rest
                # runs under a cancel scope to the deadline (the timer only reaches the
                # worker). Executions that never call the host never pay for one.
                loop = worker.loop
                delay = None if loop is None else deadline - loop.time()
                with anyio.move_on_after(delay) as scope:  # cheaper than CancelScope(...)
                    await self._serve(run, needs_host)
                if scope.cancelled_caught:
                    raise _TimedOut
            assert run.result is not None
            return run.result
        except _Violation as exc:
            worker.kill()
            return None, ExecError(K.PROTOCOL_VIOLATION, f"worker sent {exc}")
        except _Failed as exc:
            worker.kill()
            return None, ExecError(exc.kind, str(exc))
        except _TimedOut:
            worker.kill()
            return None, _timed_out(message["cpu"])
        except WorkerGone as exc:
            if worker.expired:
                return None, _timed_out(message["cpu"])
            return None, await _crash(worker, str(exc))

    async def _serve(self, run: _Serving, pending: dict[str, Any] | None) -> dict[str, Any] | None:
        """Serve the worker's frames until ``done`` (sets ``run.result``, returns None).
        Without ``pending`` it stops at the first frame that needs the host and returns
        it; with it (that frame), it serves that one and everything after it."""
        worker = run.worker
        frame = pending
        while True:
            if frame is None:
                frame = await worker.recv(self._host_spin(worker))
                if self._may_poll:  # what the worker's frame tells about polling
                    now, sent = time.perf_counter(), frame.get("ts")
                    worker.answered_in = (sent if type(sent) is float else now) - worker.sent_at
                    awake = frame.get("t") == "log" or frame.get("sp") is True
                    worker.polls_until = now + _AWAKE_FOR if awake else 0.0
                if frame.get("n") != run.nonce:
                    raise _Violation("a frame of another execution")
            t = frame.get("t")
            if t == "log" and frame.keys() <= _LOG_KEYS:
                if pending is None:
                    return frame
                line = frame.get("line")
                if not isinstance(line, str):
                    raise _Violation("a log line must be a string")
                run.log_bytes += len(line.encode("utf-8", "replace"))
                if run.log_bytes > MAX_LOG_BYTES:
                    raise _Failed(K.OUTPUT_LIMIT, f"logs are over {MAX_LOG_BYTES} bytes")
                run.logs.append(line)
                await run.host.log(line)
            elif t == "call" and frame.keys() == _CALL_KEYS:
                if pending is None:
                    return frame
                call_id, op = frame["id"], frame["op"]
                if type(call_id) is not int or op not in OPS:
                    raise _Violation("a malformed host call")
                if run.bridge is None:
                    run.bridge = HostBridge(run.host)
                reply = await run.bridge.serve(call_id, op, frame["a"])
                reply["s"] = self._worker_spin(worker)
                await worker.send(reply)
            elif t == "done" and frame.keys() <= _DONE_KEYS:
                if frame.get("has") is True:
                    worker.scripts.add(run.key)
                run.result = self._finish(worker, frame)
                return None
            else:
                raise _Violation(f"an unexpected frame {str(t)[:40]!r}")
            frame = None

    def _cpus_to_spare(self, worker: WorkerProcess) -> bool:
        """Whether the host and every execution in flight can poll on a CPU of their
        own, with the machine's other runnable tasks on the remaining ones."""
        if not self._may_poll or self._in_flight >= _CPUS:
            return False
        ours = 1 + int(time.perf_counter() < worker.polls_until)  # the host, a polling worker
        return 1 + self._in_flight + self._run_queue.others(ours) <= _CPUS

    def _worker_spin(self, worker: WorkerProcess) -> int:
        """The polling window (µs) for the worker's next wait."""
        return WORKER_SPIN_US if self._cpus_to_spare(worker) else 0

    def _host_spin(self, worker: WorkerProcess) -> float:
        """How long to busy-poll for the worker's next frame before yielding."""
        if (
            self._in_flight == 1
            and worker.answered_in <= HOST_SPIN
            and time.perf_counter() < worker.polls_until
            and self._cpus_to_spare(worker)
        ):
            return HOST_SPIN
        return 0.0

    def _finish(
        self, worker: WorkerProcess, frame: dict[str, Any]
    ) -> tuple[ScriptResponse | None, ExecError | None]:
        cpu = frame.get("cpu")
        if isinstance(cpu, (int, float)) and not isinstance(cpu, bool):
            worker.cpu = float(cpu)
        if frame.get("cached") is True:
            self.cache_hits += 1
        else:
            self.compiles += 1
        ok = frame.get("ok")
        if ok is True:
            try:
                response = ScriptResponse.from_wire(frame.get("resp"))
            except WireError as exc:
                worker.kill()
                return None, ExecError(K.PROTOCOL_VIOLATION, f"bad response: {exc}")
            if len(response.body) > MAX_RESPONSE_BYTES:
                worker.kill()
                return None, ExecError(
                    K.OUTPUT_LIMIT, f"response body is over {MAX_RESPONSE_BYTES} bytes"
                )
            if not 100 <= response.status <= 599:
                worker.kill()
                return None, ExecError(K.PROTOCOL_VIOLATION, "bad response status")
            return response, None
        kind, msg, tb = frame.get("kind"), frame.get("msg"), frame.get("tb")
        if (
            ok is not False
            or kind not in _WORKER_KINDS
            or not isinstance(msg, str)
            or not (tb is None or isinstance(tb, str))
        ):
            worker.kill()
            return None, ExecError(K.PROTOCOL_VIOLATION, "worker sent a malformed result")
        if kind in _RECYCLE:
            worker.kill()
        return None, ExecError(
            K(kind), msg[:MAX_MESSAGE_CHARS], None if tb is None else tb[-MAX_TRACEBACK_CHARS:]
        )


def _timed_out(timeout: float) -> ExecError:
    return ExecError(K.TIMEOUT, f"the script ran past its {timeout} s timeout")


async def _crash(worker: WorkerProcess, why: str) -> ExecError:
    code = await worker.wait_exit(0.5)
    worker.kill()
    if code is None:
        return ExecError(K.PROTOCOL_VIOLATION, f"worker closed its channel ({why})")
    if code == -signal.SIGXCPU:
        return ExecError(K.CPU_LIMIT, "CPU time limit exceeded")
    if code == -signal.SIGXFSZ:
        return ExecError(K.FILE_SIZE_LIMIT, "file size limit exceeded")
    what = f"signal {-code}" if code < 0 else f"status {code}"
    return ExecError(K.WORKER_CRASH, f"the worker exited with {what}")


def _log_missing(layer: str, why: str) -> None:
    if layer not in _logged_missing:
        _logged_missing.add(layer)
        log.warning("executor isolation layer %s is not active: %s", layer, why)


def _note_layers(layers: dict[str, Any]) -> None:
    if not layers.get("landlock"):
        _log_missing("landlock", "the kernel offers no Landlock ABI")
    if not layers.get("seccomp"):
        _log_missing("seccomp", "no seccomp filter for this architecture")
