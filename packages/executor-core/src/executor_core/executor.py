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
the rules are in ``polling``; ``busy_poll=False`` turns it off.

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
import time
from typing import TYPE_CHECKING, Any, Self

import anyio

from executor_core.host_bridge import OPS, HostBridge
from executor_core.polling import Polling
from executor_core.pool import WorkerPool
from executor_core.process import WorkerGone, WorkerProcess, WorkerSpec
from executor_core.scratch import make_scratch_root
from executor_core.uids import UidClaim
from picloud_shared.execution import ExecError, ExecResult, ScriptResponse
from picloud_shared.limits import (
    MAX_LOG_BYTES,
    MAX_MEMORY_LIMIT_MB,
    MAX_MESSAGE_CHARS,
    MAX_RESPONSE_BYTES,
    MAX_TIMEOUT_SECONDS,
    MAX_TRACEBACK_CHARS,
)
from picloud_shared.responses import status_problem
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
DEFAULT_SCRATCH_LIMIT = 64 * MIB  # all a worker's scratch files together (a tmpfs)
CPU_LIFETIME_SECONDS = 3600

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
        scratch_limit: int = DEFAULT_SCRATCH_LIMIT,
        busy_poll: bool = True,  # poll the pipes briefly while CPUs are free (polling.py)
    ) -> None:
        self._scratch_parent = scratch_root
        self._uid_base = uid_base if _is_root() else None
        self._file_size_limit = file_size_limit
        self._scratch_limit = scratch_limit
        self._max_executions = max_executions_per_worker
        self._pool_args = dict(max_workers=max_workers, spares=spare_workers, idle_ttl=idle_ttl)
        self._pool: WorkerPool | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._closed = False
        self._in_flight = 0  # executions running in a worker now
        self._polling = Polling(busy_poll)
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
            scratch_bytes=self._scratch_limit if _is_root() else None,
        )
        self._pool = WorkerPool(spec, **self._pool_args)  # type: ignore[arg-type]
        stack = contextlib.AsyncExitStack()
        if claim is not None:
            stack.callback(claim.release)
        stack.callback(shutil.rmtree, root, True)
        if self._polling.enabled:
            self._polling.open()
            stack.callback(self._polling.close)
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
        worker = await pool.acquire((request.app_id, request.principal.data_rights), address_space)
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
            "s": self._polling.worker_spin(worker, self._in_flight),
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
                frame = await worker.recv(self._polling.host_spin(worker, self._in_flight))
                if self._polling.enabled:
                    self._polling.observe(worker, frame)
                if frame.get("n") != run.nonce:
                    raise _Violation("a frame of another execution")
            t = frame.get("t")
            if t == "log" and frame.keys() <= _LOG_KEYS:
                if pending is None:
                    return frame
                line = frame.get("line")
                if not isinstance(line, str):
                    raise _Violation("a log line must be a string")
                run.log_bytes += len(line.encode("utf-8", "replace")) + 1  # and its newline
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
                reply["s"] = self._polling.worker_spin(worker, self._in_flight)
                await worker.send(reply)
            elif t == "done" and frame.keys() <= _DONE_KEYS:
                if frame.get("has") is True:
                    worker.scripts.add(run.key)
                run.result = self._finish(worker, frame)
                return None
            else:
                raise _Violation(f"an unexpected frame {str(t)[:40]!r}")
            frame = None

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
            if status_problem(response.status) is not None:
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
    if not layers.get("scratch_quota"):
        _log_missing("scratch_quota", "not running as root: scratch space is not bounded")
