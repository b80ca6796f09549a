"""One worker process as the host sees it: spawn, frames in and out, kill, reap.

A worker is spawned with ``sys.executable -I -m executor_core.worker`` — a fresh
interpreter, never a fork of the server's memory: an empty environment, only the
two pipe ends passed (``close_fds``), its own session (so its process group can
be killed whole), stdio on ``/dev/null``, and a fresh scratch directory as cwd,
owned by the slot's uid and removed when the worker is reaped. ``Popen`` runs in
a thread so the event loop never blocks on it; no ``preexec_fn`` is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import json.decoder  # noqa: F401 - the C scanner in frames raises its JSONDecodeError
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

import anyio
import attrs

from executor_core import frames

if TYPE_CHECKING:
    from executor_core.pool import Tenant


# The most a worker may have sent that the host has not taken yet. An execution's
# log lines (64 KiB, with their framing) and its largest frame fit; past it the
# worker writes while the host does not read, and is stopped.
MAX_UNREAD_BYTES = frames.MAX_FRAME_BYTES + 4 * 1024 * 1024


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# One read's size. Under glibc's mmap threshold (128 KiB): a larger buffer is an
# mmap, a shrinking mremap and a munmap per frame, and the munmap of a threaded
# process sends TLB-shootdown interrupts to the other CPUs (costly on a VM: a warm
# no-op's host CPU fell by ~30 µs of ~195). A bigger frame takes several reads.
READ_SIZE = 1 << 16


class WorkerGone(Exception):
    """The worker's pipe closed or broke the framing."""


class SpawnFailed(RuntimeError):
    """A worker could not be started or did not report ready."""


@attrs.define
class WorkerSpec:
    """How every worker of a pool is started."""

    scratch_root: str
    address_space: int  # bytes; RLIMIT_AS ceiling, lowered per execution
    cpu_lifetime: int  # seconds; RLIMIT_CPU hard limit over the worker's life
    file_size: int  # bytes; RLIMIT_FSIZE
    open_files: int = 64
    scratch_bytes: int | None = None  # the scratch tmpfs (as root); None: no quota
    processes: int = 32  # RLIMIT_NPROC of the slot uid (threads count)
    uids: list[int] | None = None  # uid (and gid) per slot; None: keep the server's
    ready_timeout: float = 10.0
    python: str = sys.executable


@attrs.define(eq=False)
class WorkerProcess:
    slot: int
    proc: subprocess.Popen[bytes]
    rfd: int  # host reads worker frames
    wfd: int  # host writes frames to the worker
    scratch: str
    address_space: int
    tenant: Tenant | None = None  # the one tenant it serves, once leased (pool.py)
    executions: int = 0
    last_used: float = attrs.field(factory=time.monotonic)
    idle_cpu: float | None = None  # its CPU seconds when an idle check first saw it
    scripts: set[str] = attrs.field(factory=set)
    cpu: float = 0.0
    layers: dict[str, Any] = attrs.field(factory=dict)
    killed: bool = False
    _reader: frames.FrameReader = attrs.field(factory=frames.FrameReader)
    _pending: list[bytes] = attrs.field(factory=list)  # frames received, not yet taken
    _unread: int = 0  # their bytes (bounded: MAX_UNREAD_BYTES)
    _reaped: anyio.Event | None = None
    _eof: str | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _waiter: asyncio.Future[None] | None = None
    expired: bool = False  # the execution's deadline passed (see expire)
    # For the executor's busy-polling choice (perf_counter times and seconds):
    sent_at: float = 0.0  # when the last frame was sent to the worker (its ``ts``)
    answered_in: float = 0.0  # how long the worker took to answer it
    polls_until: float = 0.0  # until when the worker surely polls its pipe

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> float | None:
        """CPU time the worker has used (user + system, all threads), from
        ``/proc/<pid>/stat``; ``None`` once it is gone."""
        try:
            with open(f"/proc/{self.proc.pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            return None
        fields = stat[stat.rfind(b")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS

    @property
    def usable(self) -> bool:
        """Not killed, and its pipe neither closed nor broken (while it was idle)."""
        return not self.killed and self._eof is None

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The asyncio loop watching this worker (None on other backends)."""
        return self._loop

    def expire(self) -> None:
        """The execution's deadline (a loop timer): kill the worker, wake its reader;
        ``recv`` raises :class:`WorkerGone` from now on."""
        self.expired = True
        self.kill()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def send(self, message: dict[str, Any]) -> None:
        """Send one frame, stamped with its send time (``ts``)."""
        self.sent_at = message["ts"] = time.perf_counter()
        view = memoryview(frames.encode(message))
        while view:
            try:
                n = os.write(self.wfd, view)
            except BlockingIOError:
                await anyio.wait_writable(self.wfd)
                continue
            except (BrokenPipeError, OSError) as exc:
                raise WorkerGone(f"write failed: {exc}") from None
            view = view[n:]

    async def recv(self, spin: float = 0.0) -> dict[str, Any]:
        """The next frame. With ``spin`` (seconds), first busy-poll the pipe that long
        without yielding to the event loop: the caller bounds it and decides when
        blocking the loop that briefly is worth a saved wake-up. Each empty poll
        yields the CPU (``sched_yield``), in case the worker runs on this one."""
        if self._pending:
            return self._take()
        if spin and self._eof is None:
            deadline = time.perf_counter() + spin
            while True:
                self._drain()
                if self._pending or self._eof is not None:
                    break
                if time.perf_counter() >= deadline:
                    break
                os.sched_yield()
        while not self._pending:
            if self._eof is not None:
                raise WorkerGone(self._eof)
            if self.expired:
                raise WorkerGone("past the deadline")
            if self._loop is not None:
                waiter = self._loop.create_future()
                self._waiter = waiter
                try:
                    await waiter
                finally:
                    self._waiter = None
                continue
            try:
                await anyio.wait_readable(self.rfd)
            except anyio.ClosedResourceError:
                raise WorkerGone("closed") from None
            self._drain()
        return self._take()

    def _take(self) -> dict[str, Any]:
        body = self._pending.pop(0)
        self._unread -= len(body)
        try:
            return frames.decode(body)
        except frames.FrameError as exc:
            self._eof = f"bad frame: {exc}"
            raise WorkerGone(self._eof) from None

    def watch(self) -> None:
        """On asyncio, keep one reader callback registered for the worker's life
        (no epoll_ctl per frame); other backends use ``anyio.wait_readable``."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        loop.add_reader(self.rfd, self._on_readable)
        self._loop = loop

    def _on_readable(self) -> None:
        self._drain()
        if self._eof is not None and self._loop is not None:
            self._loop.remove_reader(self.rfd)
        waiter = self._waiter
        if waiter is not None and not waiter.done() and (self._pending or self._eof):
            waiter.set_result(None)

    def _drain(self) -> None:
        """Read what is there (non-blocking) into decoded frames, or note the end."""
        if self._eof is not None:
            return
        try:
            data = os.read(self.rfd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._eof = f"read failed: {exc}"
            return
        if not data:
            self._eof = "end of file"
            return
        try:
            bodies = self._reader.bodies(data)
        except frames.FrameError as exc:
            self._eof = f"bad frame: {exc}"
            return
        self._pending.extend(bodies)
        self._unread += sum(map(len, bodies))
        if self._unread > MAX_UNREAD_BYTES:
            # A worker that writes while the host does not read (it ignores the
            # host's replies, or runs a thread after its execution) would fill the
            # host's memory: it is stopped instead.
            self._pending.clear()
            self._unread = 0
            self._eof = "the worker sent far more than the host took"
            self.kill()

    def kill(self) -> None:
        """SIGKILL the worker's whole process group (it is its own session)."""
        if not self.killed:
            self.killed = True
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    async def wait_exit(self, grace: float) -> int | None:
        """The exit status if the worker ends by itself within ``grace`` seconds."""
        deadline = time.monotonic() + grace
        while True:
            code = self.proc.poll()
            if code is not None or time.monotonic() >= deadline:
                return code
            await anyio.sleep(0.005)

    def reap_blocking(self) -> None:
        """:meth:`reap` for when no event loop task can do it (after shutdown)."""
        if self._reaped is not None:
            return
        self._reaped = anyio.Event()
        self.kill()
        self.proc.wait()
        self._close_fds()
        shutil.rmtree(self.scratch, ignore_errors=True)
        self._reaped.set()

    def _close_fds(self) -> None:
        if self._loop is not None and self._eof is None:
            self._loop.remove_reader(self.rfd)
        self._eof = self._eof or "closed"
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        for fd in (self.rfd, self.wfd):
            anyio.notify_closing(fd)
            os.close(fd)

    async def reap(self) -> None:
        """Kill, wait for the exit, close the pipes, remove the scratch dir. Idempotent."""
        if self._reaped is not None:
            await self._reaped.wait()
            return
        self._reaped = anyio.Event()
        try:
            self.kill()
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.proc.wait)
                self._close_fds()
                await anyio.to_thread.run_sync(
                    lambda: shutil.rmtree(self.scratch, ignore_errors=True)
                )
        finally:
            self._reaped.set()


def _start(spec: WorkerSpec, slot: int) -> WorkerProcess:
    """Blocking part of a spawn (runs in a thread)."""
    uid = None if spec.uids is None else spec.uids[slot]
    scratch = os.path.join(spec.scratch_root, f"w{slot}-{secrets.token_hex(4)}")
    os.mkdir(scratch, 0o700)
    if uid is not None:
        os.chown(scratch, uid, uid)
    to_child_r, to_child_w = os.pipe2(os.O_CLOEXEC)
    from_child_r, from_child_w = os.pipe2(os.O_CLOEXEC)
    argv = [
        spec.python,
        "-I",
        "-m",
        "executor_core.worker",
        "--rfd",
        str(to_child_r),
        "--wfd",
        str(from_child_w),
        "--scratch",
        scratch,
        "--address-space",
        str(spec.address_space),
        "--cpu",
        str(spec.cpu_lifetime),
        "--fsize",
        str(spec.file_size),
        "--nofile",
        str(spec.open_files),
        "--nproc",
        str(spec.processes),
    ]
    if uid is not None:
        argv += ["--uid", str(uid), "--gid", str(uid)]
    if spec.scratch_bytes is not None:
        argv += ["--scratch-bytes", str(spec.scratch_bytes)]
    try:
        proc = subprocess.Popen(
            argv,
            env={},
            cwd=scratch,
            close_fds=True,
            pass_fds=(to_child_r, from_child_w),
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    except BaseException:
        for fd in (to_child_r, to_child_w, from_child_r, from_child_w):
            os.close(fd)
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    os.close(to_child_r)
    os.close(from_child_w)
    os.set_blocking(from_child_r, False)
    os.set_blocking(to_child_w, False)
    return WorkerProcess(slot, proc, from_child_r, to_child_w, scratch, spec.address_space)


async def spawn(spec: WorkerSpec, slot: int) -> WorkerProcess:
    """Start a worker and wait (without blocking the loop) until it reports ready."""
    worker = await anyio.to_thread.run_sync(_start, spec, slot)
    worker.watch()
    try:
        with anyio.fail_after(spec.ready_timeout):
            ready = await worker.recv()
        if ready.get("t") != "ready" or ready.get("ok") is not True:
            raise SpawnFailed(f"worker failed to start: {ready.get('error')!r}")
        layers = ready.get("layers")
        worker.layers = layers if isinstance(layers, dict) else {}
    except (WorkerGone, TimeoutError) as exc:
        await worker.reap()
        raise SpawnFailed(f"worker did not become ready: {exc}") from None
    except BaseException:
        await worker.reap()
        raise
    return worker
