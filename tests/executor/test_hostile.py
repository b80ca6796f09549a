"""The hostile suite: each attack is blocked and classified, and the host survives."""

from __future__ import annotations

import json
import os
import socket
import stat
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator

import anyio
import attrs
import pytest

from executor_core.executor import DEFAULT_SCRATCH_LIMIT, ProcessExecutor
from executor_core.memory_host import MemoryHostApi
from picloud_shared.execution import ExecRequest, ExecResult
from picloud_shared.principals import Capability
from picloud_shared.status import ExecErrorKind

from .conftest import new_app

MakeRequest = Callable[..., ExecRequest]
pytestmark = pytest.mark.anyio

ATTEMPT = textwrap.dedent("""
    def attempt(fn):
        try:
            return "ok: " + repr(fn())[:200]
        except BaseException as exc:
            return type(exc).__name__ + ": " + str(exc)[:200]
""")


def src(body: str) -> str:
    return ATTEMPT + textwrap.dedent(body).strip() + "\n"


def body(result: ExecResult) -> object:
    assert result.error is None, result.error
    assert result.response is not None
    return json.loads(result.response.body)


def kind(result: ExecResult) -> ExecErrorKind:
    assert result.error is not None, result.response
    return result.error.kind


@pytest.fixture
def shared_dir() -> Iterator[str]:
    """A world-readable directory outside any scratch dir."""
    path = tempfile.mkdtemp(prefix="picloud-hostile-")
    os.chmod(path, 0o755)
    yield path
    for name in os.listdir(path):
        os.unlink(os.path.join(path, name))
    os.rmdir(path)


async def test_server_environment_is_unreadable(
    executor: ProcessExecutor,
    host: MemoryHostApi,
    make_request: MakeRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Neither the worker's environment nor /proc/<ppid>/environ shows the server's."""
    monkeypatch.setenv("PICLOUD_TEST_SECRET", "hunter2-secret")
    source = src("""
    import os
    def handle(e, ctx):
        return {
            "env": dict(os.environ),
            "parent": attempt(lambda: open(f"/proc/{os.getppid()}/environ", "rb").read()),
            "parent_cmdline_mem": attempt(lambda: open(f"/proc/{os.getppid()}/mem", "rb").read(1)),
            "init": attempt(lambda: open("/proc/1/environ", "rb").read()),
        }
    """)
    result = await executor.execute(make_request(source), host)
    out = body(result)
    assert isinstance(out, dict)
    assert set(out["env"]) <= {"LC_CTYPE"}  # set by the interpreter itself (PEP 538)
    assert out["parent"].startswith("PermissionError")
    assert out["parent_cmdline_mem"].startswith("PermissionError")
    assert out["init"].startswith("PermissionError")
    assert "hunter2" not in json.dumps(out)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to own a root-only file")
async def test_root_only_file_is_unreadable(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest, shared_dir: str
) -> None:
    """A 0600 root-owned file cannot be read; nor, now that reads are confined too,
    can the world-readable directory that holds it be listed."""
    secret = os.path.join(shared_dir, "secret")
    await anyio.Path(secret).write_text("root-only-content")
    os.chmod(secret, stat.S_IRUSR | stat.S_IWUSR)
    source = src(f"""
    import os
    def handle(e, ctx):
        return [os.getuid(), attempt(lambda: open({secret!r}).read()),
                attempt(lambda: os.listdir({shared_dir!r}))]
    """)
    uid, read, listing = body(await executor.execute(make_request(source), host))  # type: ignore[misc]
    assert uid != 0
    assert read.startswith("PermissionError")
    assert "root-only-content" not in read
    assert listing.startswith("PermissionError")


async def test_the_hosts_files_are_unreadable(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest
) -> None:
    """API.md: scripts cannot reach the host's files. World-readable files of the host
    (/etc/passwd, this test's own source, /tmp), other processes' /proc entries (the
    server's command line, PID 1's), and what the worker's own /proc entry shows of
    the host (its sockets and routes in net/, its mount table, maps and command line)
    are refused; the script's scratch directory, its own status and descriptors and
    the interpreter's files are not."""
    source = src(f"""
    import os, json
    def handle(e, ctx):
        with open("mine.txt", "w") as f:
            f.write("scratch")
        return {{
            "passwd": attempt(lambda: open("/etc/passwd").read()),
            "source": attempt(lambda: open({__file__!r}).read()),
            "tmp": attempt(lambda: os.listdir("/tmp")),
            "server": attempt(lambda: open(f"/proc/{{os.getppid()}}/cmdline").read()),
            "init": attempt(lambda: open("/proc/1/cmdline").read()),
            "scratch": attempt(lambda: [os.listdir("."), open("mine.txt").read()]),
            "self": attempt(lambda: open("/proc/self/status").read()[:5]),
            "fds": attempt(lambda: os.listdir("/proc/self/fd") and None),
            "stdlib": attempt(lambda: open(json.__file__).read()[:3]),
            "net_tcp": attempt(lambda: open("/proc/net/tcp").read()),
            "net_unix": attempt(lambda: open("/proc/self/net/unix").read()),
            "thread_net": attempt(
                lambda: open(f"/proc/self/task/{{os.getpid()}}/net/route").read()
            ),
            "mountinfo": attempt(lambda: open("/proc/self/mountinfo").read()),
            "mounts": attempt(lambda: open("/proc/mounts").read()),
            "maps": attempt(lambda: open("/proc/self/maps").read()),
            "cmdline": attempt(lambda: open("/proc/self/cmdline").read()),
        }}
    """)
    seen = body(await executor.execute(make_request(source), host))
    assert isinstance(seen, dict)
    hidden = ("net_tcp", "net_unix", "thread_net", "mountinfo", "mounts", "maps", "cmdline")
    for what in ("passwd", "source", "tmp", "server", "init", *hidden):
        assert seen[what].startswith("PermissionError"), (what, seen[what])
    assert seen["scratch"] == "ok: [['mine.txt'], 'scratch']"
    assert seen["self"].startswith("ok")
    assert seen["fds"] == "ok: None"
    assert seen["stdlib"].startswith("ok")


STDLIB_IMPORTS = """
import importlib, sys
SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "webbrowser",
        "pydoc", "ensurepip", "venv", "lib2to3"}
def failed_imports():
    failed = []
    for name in sorted(sys.stdlib_module_names - SKIP):
        try:
            importlib.import_module(name)
        except BaseException:
            failed.append(name)
    return failed
"""
STDLIB_SWEEP = src(
    STDLIB_IMPORTS
    + """
import os
def handle(e, ctx):
    failed = failed_imports()
    import time, zoneinfo, mimetypes, locale, uuid, tempfile, ctypes, decimal
    checks = {
        "localtime": lambda: time.localtime(),
        "zoneinfo": lambda: zoneinfo.available_timezones() and None,
        "mimetypes": lambda: mimetypes.guess_type("a.json"),
        "locale": lambda: locale.getpreferredencoding(),
        "cpu_count": lambda: os.cpu_count(),
        "uuid": lambda: uuid.uuid4(),
        "tempfile": lambda: tempfile.TemporaryFile().close(),
        "ctypes": lambda: ctypes.CDLL(None).getpid(),
        "decimal": lambda: decimal.Decimal("1.1") + 1,
    }
    broken = {}
    for name, check in checks.items():
        try:
            check()
        except BaseException as exc:
            broken[name] = repr(exc)
    return {"failed": failed, "broken": broken}
"""
)


async def test_the_standard_library_works_within_the_read_rules(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest
) -> None:
    """Every standard library module that imports in a plain interpreter imports in a
    worker too, and the calls that read system data (time zones, MIME types, locale,
    the CPU count, temporary files, shared libraries) work: the read rules take
    nothing away a script may use."""
    seen = body(await executor.execute(make_request(STDLIB_SWEEP, timeout_seconds=60), host))
    assert isinstance(seen, dict)
    plain = await anyio.run_process(
        [
            sys.executable,
            "-I",
            "-c",
            STDLIB_IMPORTS + "import json\nprint(json.dumps(failed_imports()))",
        ],
        cwd=tempfile.gettempdir(),
    )
    baseline = set(json.loads(plain.stdout.decode().strip().splitlines()[-1]))
    assert set(seen["failed"]) - baseline == set()
    assert seen["broken"] == {}


async def test_writes_outside_scratch_are_denied(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest, shared_dir: str
) -> None:
    """Writing to /tmp, /dev/shm or a world-writable dir fails; the scratch dir works."""
    os.chmod(shared_dir, 0o777)
    source = src(f"""
    import os
    def handle(e, ctx):
        def write(path):
            with open(path, "w") as f:
                f.write("x")
            return os.path.getsize(path)
        return {{
            "tmp": attempt(lambda: write("/tmp/picloud-escape")),
            "shm": attempt(lambda: write("/dev/shm/picloud-escape")),
            "shared": attempt(lambda: write({shared_dir!r} + "/escape")),
            "mkdir": attempt(lambda: os.mkdir("/tmp/picloud-escape-dir")),
            "scratch": attempt(lambda: write("mine.txt")),
            "cwd_is_scratch": os.getcwd(),
        }}
    """)
    out = body(await executor.execute(make_request(source), host))
    assert isinstance(out, dict)
    for key in ("tmp", "shm", "shared", "mkdir"):
        assert out[key].startswith("PermissionError"), (key, out[key])
    assert out["scratch"] == "ok: 1"
    assert not await anyio.Path("/tmp/picloud-escape").exists()
    assert not await anyio.Path("/dev/shm/picloud-escape").exists()
    assert os.listdir(shared_dir) == []
    assert out["cwd_is_scratch"].startswith(executor.pool.spec.scratch_root)


async def test_tcp_connect_to_local_listener_is_blocked(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest
) -> None:
    """A script cannot reach a port listening on 127.0.0.1."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        source = src(f"""
        import socket
        def handle(e, ctx):
            return [attempt(lambda: socket.create_connection(("127.0.0.1", {port}), timeout=0.5)),
                    attempt(lambda: socket.socket(socket.AF_INET6)),
                    attempt(lambda: socket.socketpair())]
        """)
        out = body(await executor.execute(make_request(source), host))
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert isinstance(out, list)
    assert all(o.startswith("PermissionError") for o in out), out


async def test_unix_socket_connect_is_blocked(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest, shared_dir: str
) -> None:
    """A script cannot connect to a UNIX socket the host listens on."""
    path = os.path.join(shared_dir, "s.sock")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        os.chmod(path, 0o777)
        listener.listen()
        listener.setblocking(False)
        source = src(f"""
        import socket
        def handle(e, ctx):
            def connect():
                s = socket.socket(socket.AF_UNIX)
                s.connect({path!r})
                return s
            return [attempt(connect)]
        """)
        out = body(await executor.execute(make_request(source), host))
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert isinstance(out, list)
    assert out[0].startswith("PermissionError"), out


async def test_a_worker_cannot_make_itself_dumpable_again(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest
) -> None:
    """PR_SET_DUMPABLE is set to 0 before the script runs, and seccomp refuses to set
    it back (other prctl options still work)."""
    source = src("""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    def handle(e, ctx):
        return [libc.prctl(4, 1, 0, 0, 0), ctypes.get_errno(), libc.prctl(3, 0, 0, 0, 0)]
    """)
    set_result, errno_, dumpable = body(await executor.execute(make_request(source), host))  # type: ignore[misc]
    assert (set_result, errno_) == (-1, 1)  # EPERM
    assert dumpable == 0


async def test_a_worker_runs_as_a_batch_task_and_cannot_leave_it(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest
) -> None:
    """Workers run SCHED_BATCH (a woken worker does not preempt its host), and a script
    cannot switch itself back to the normal policy."""
    source = src("""
    import os
    def handle(e, ctx):
        return [os.sched_getscheduler(0),
                attempt(lambda: os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))),
                os.sched_getscheduler(0)]
    """)
    before, switched, after = body(await executor.execute(make_request(source), host))  # type: ignore[misc]
    assert before == os.SCHED_BATCH
    assert switched.startswith("PermissionError"), switched
    assert after == os.SCHED_BATCH


async def test_fork_and_exec_are_blocked(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest
) -> None:
    """os.fork, subprocess and exec fail with an exception the script can catch."""
    source = src("""
    import os, subprocess
    def handle(e, ctx):
        return [attempt(os.fork),
                attempt(lambda: subprocess.run(["/bin/true"])),
                attempt(lambda: os.execv("/bin/true", ["true"])),
                attempt(lambda: os.posix_spawn("/bin/true", ["true"], {}))]
    """)
    out = body(await executor.execute(make_request(source), host))
    assert isinstance(out, list)
    assert all(o.startswith("PermissionError") for o in out), out


async def test_memory_outside_the_address_space_limit_is_refused(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest
) -> None:
    """System V shared memory, semaphores and message queues, POSIX message queues
    and memfds hold memory RLIMIT_AS does not count, and the IPC objects outlive the
    worker, readable by the next worker with its uid: all refused. ctypes callbacks
    (libffi closures) still work without memfds."""
    source = src("""
    import ctypes, os
    libc = ctypes.CDLL(None, use_errno=True)
    def call(name, *args):
        def go():
            if getattr(libc, name)(*args) == -1:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
        return go
    def handle(e, ctx):
        callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)(lambda x: x + 1)
        return [attempt(call("shmget", 0, ctypes.c_size_t(1 << 20), 0o1666)),
                attempt(call("semget", 0, 1, 0o1666)),
                attempt(call("msgget", 0, 0o1666)),
                attempt(call("mq_open", b"/picloud-probe", os.O_CREAT | os.O_RDWR, 0o600, None)),
                attempt(lambda: os.memfd_create("x")),
                callback(41)]
    """)
    out = body(await executor.execute(make_request(source), host))
    assert isinstance(out, list)
    *refused, called = out
    assert all(
        "Operation not permitted" in o or o.startswith("PermissionError") for o in refused
    ), out
    assert called == 42


async def test_thread_bomb_is_bounded(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest
) -> None:
    """Threads run out long before the host notices; the script gets an error."""
    source = src("""
    import threading, time
    def handle(e, ctx):
        threads = []
        try:
            for _ in range(10_000):
                t = threading.Thread(target=time.sleep, args=(5,), daemon=True)
                t.start()
                threads.append(t)
        except RuntimeError as exc:
            return [len(threads), str(exc)]
        return [len(threads), "unbounded"]
    """)
    started, why = body(await executor.execute(make_request(source), host))  # type: ignore[misc]
    assert started < 64
    assert why != "unbounded"
    ok = await executor.execute(make_request("def handle(e, ctx):\n    return 1\n"), host)
    assert body(ok) == 1


async def test_signalling_the_host_fails(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest
) -> None:
    """os.kill of the parent (or its group, or init) is refused; the host lives on."""
    source = src("""
    import os, signal
    def handle(e, ctx):
        return [attempt(lambda: os.kill(os.getppid(), signal.SIGTERM)),
                attempt(lambda: os.kill(os.getppid(), signal.SIGKILL)),
                attempt(lambda: os.killpg(os.getpgid(os.getppid()), signal.SIGTERM)),
                attempt(lambda: os.kill(1, signal.SIGTERM))]
    """)
    out = body(await executor.execute(make_request(source), host))
    assert isinstance(out, list)
    assert all(o.startswith("PermissionError") for o in out), out


async def test_other_workers_memory_is_unreadable(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest
) -> None:
    """An app cannot read another app's worker memory or environment through /proc."""
    pid_src = "import os\ndef handle(e, ctx):\n    return os.getpid()\n"
    victim = body(await executor.execute(make_request(pid_src, app_id=new_app()), host))
    source = src("""
    import os
    def handle(e, ctx):
        pid = e["pid"]
        return [attempt(lambda: open(f"/proc/{pid}/mem", "rb").read(1)),
                attempt(lambda: open(f"/proc/{pid}/environ", "rb").read()),
                attempt(lambda: os.readlink(f"/proc/{pid}/cwd")),
                attempt(lambda: os.listdir(f"/proc/{pid}/fd"))]
    """)
    out = body(await executor.execute(make_request(source, {"pid": victim}), host))
    assert isinstance(out, list)
    assert all(o.startswith("PermissionError") for o in out), out


async def test_allocating_past_memory_limit_is_memory_limit(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest
) -> None:
    """A 1 GiB allocation under a 32 MB limit is memory_limit; the worker is replaced."""
    pid_src = "import os\ndef handle(e, ctx):\n    return os.getpid()\n"
    before = body(await executor.execute(make_request(pid_src, memory_limit_mb=32), host))
    hog = "def handle(e, ctx):\n    return len(bytearray(1 << 30))\n"
    result = await executor.execute(make_request(hog, memory_limit_mb=32), host)
    assert kind(result) is ExecErrorKind.MEMORY_LIMIT
    after = body(await executor.execute(make_request(pid_src, memory_limit_mb=32), host))
    assert before != after


async def test_an_event_that_outgrows_the_memory_limit_is_memory_limit(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest
) -> None:
    """An event of 1.5 million empty objects is a 3 MiB frame but about 110 MB of
    Python objects, past a 16 MB script's address space: the execution is
    ``memory_limit`` (507), the script's limit being too small for what it is given,
    not a worker crash (500); the worker is replaced, and the next execution runs."""
    pid_src = "import os\ndef handle(e, ctx):\n    return os.getpid()\n"
    before = body(await executor.execute(make_request(pid_src, memory_limit_mb=16), host))
    event = {"items": [{} for _ in range(1_500_000)]}
    result = await executor.execute(make_request(pid_src, event, memory_limit_mb=16), host)
    assert kind(result) is ExecErrorKind.MEMORY_LIMIT, result.error
    assert result.error is not None
    assert "does not fit in the script's memory limit" in result.error.message
    after = body(await executor.execute(make_request(pid_src, memory_limit_mb=16), host))
    assert before != after


async def test_busy_loop_is_timeout(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest
) -> None:
    """`while True: pass` is stopped at the deadline."""
    started = time.monotonic()
    busy = "def handle(e, ctx):\n    while True:\n        pass\n"
    result = await executor.execute(make_request(busy, timeout_seconds=1), host)
    assert kind(result) in (ExecErrorKind.TIMEOUT, ExecErrorKind.CPU_LIMIT)
    assert time.monotonic() - started < 5


async def test_sleep_past_deadline_is_timeout(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest
) -> None:
    """A sleeping script is killed at its wall-clock deadline and the app keeps working."""
    started = time.monotonic()
    sleeper = "import time\ndef handle(e, ctx):\n    time.sleep(30)\n"
    result = await executor.execute(make_request(sleeper, timeout_seconds=1), host)
    assert kind(result) is ExecErrorKind.TIMEOUT
    assert 0.9 < time.monotonic() - started < 5
    ok = await executor.execute(make_request("def handle(e, ctx):\n    return 1\n"), host)
    assert body(ok) == 1


async def test_cpu_limit_is_cpu_limit(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest
) -> None:
    """Exhausting RLIMIT_CPU (SIGXCPU) is cpu_limit, and the worker is replaced.

    The executor's per-execution CPU budget equals the timeout, so on an idle machine
    the wall deadline usually fires first for a single thread; the script lowers its
    own soft limit to reach the kernel's CPU accounting deterministically.
    """
    source = src("""
    import os, resource
    def handle(e, ctx):
        used = resource.getrusage(resource.RUSAGE_SELF)
        soft = int(used.ru_utime + used.ru_stime) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (soft, resource.getrlimit(resource.RLIMIT_CPU)[1]))
        while True:
            pass
    """)
    result = await executor.execute(make_request(source, timeout_seconds=5), host)
    assert kind(result) is ExecErrorKind.CPU_LIMIT


async def test_huge_file_is_file_size_limit(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest
) -> None:
    """Writing past RLIMIT_FSIZE is file_size_limit."""
    source = (
        "def handle(e, ctx):\n    with open('big', 'wb') as f:\n"
        "        for _ in range(1000):\n            f.write(b'x' * (1 << 20))\n"
    )
    result = await executor.execute(make_request(source), host)
    assert kind(result) is ExecErrorKind.FILE_SIZE_LIMIT


@pytest.mark.skipif(os.geteuid() != 0, reason="the scratch tmpfs needs root")
async def test_many_files_fill_only_the_workers_scratch_quota(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest
) -> None:
    """Files under the 16 MiB limit each, written until something stops them: the
    worker's scratch space (a tmpfs of DEFAULT_SCRATCH_LIMIT) runs out with ENOSPC,
    the script can catch it and free the space, and nothing reaches the host's disk
    (the scratch directory the host sees stays empty)."""
    source = src("""
    import errno, os
    def handle(e, ctx):
        written = 0
        try:
            for i in range(1000):
                with open(f"f{i}", "wb") as f:
                    for _ in range(8):
                        f.write(b"x" * (1 << 20))
                        written += 1 << 20
        except OSError as exc:
            stopped = errno.errorcode.get(exc.errno, str(exc.errno))
        for name in os.listdir("."):
            os.remove(name)
        with open("again", "wb") as f:
            f.write(b"y" * (1 << 20))
        return [written, stopped, os.getpid()]
    """)
    written, stopped, pid = body(await executor.execute(make_request(source), host))  # type: ignore[misc]
    assert stopped == "ENOSPC"
    assert DEFAULT_SCRATCH_LIMIT - 16 * 2**20 <= written <= DEFAULT_SCRATCH_LIMIT
    (worker,) = [w for w in executor.pool.idle_workers() if w.pid == pid]
    assert os.listdir(worker.scratch) == []
    assert worker.layers["scratch_quota"] is True


@pytest.mark.parametrize(
    "printer",
    ["print('x' * 100_000_000)", "for _ in range(1_000_000):\n        print('x' * 100)"],
)
async def test_printing_100_mb_is_output_limit(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest, printer: str
) -> None:
    """100 MB of print is cut at the log cap and classified output_limit."""
    result = await executor.execute(make_request(f"def handle(e, ctx):\n    {printer}\n"), host)
    assert kind(result) is ExecErrorKind.OUTPUT_LIMIT
    assert sum(len(line) for line in result.logs) <= 64 * 1024


async def test_unbounded_recursion_is_contained(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest
) -> None:
    """Recursion is a RecursionError; with the limit lifted the worker dies, not the host."""
    plain = "def f(n):\n    return f(n + 1)\ndef handle(e, ctx):\n    return f(0)\n"
    result = await executor.execute(make_request(plain), host)
    assert kind(result) is ExecErrorKind.UNCAUGHT_EXCEPTION
    assert result.error is not None
    assert "RecursionError" in result.error.message
    lifted = "import sys\nsys.setrecursionlimit(10**7)\n" + plain
    result = await executor.execute(
        make_request(lifted, memory_limit_mb=32, timeout_seconds=2), host
    )
    assert result.error is not None  # the heap (3.11 frames) or the deadline ends it
    ok = await executor.execute(make_request("def handle(e, ctx):\n    return 1\n"), host)
    assert body(ok) == 1


FORGE = textwrap.dedent("""
    import gc, json, os, struct, sys
    def channel():
        return next(o for o in gc.get_objects() if type(o).__name__ == "Channel")
    def send(frame):
        wfd = int(sys.argv[sys.argv.index("--wfd") + 1])
        data = json.dumps(frame).encode()
        os.write(wfd, struct.pack(">I", len(data)) + data)
""")


async def test_forged_frame_claiming_another_app_is_protocol_violation(
    executor: ProcessExecutor, make_request: MakeRequest
) -> None:
    """A raw call frame naming another app is refused and nothing is written anywhere."""
    mine, other = MemoryHostApi(), MemoryHostApi()
    other_app = new_app()
    source = FORGE + textwrap.dedent(f"""
    def handle(e, ctx):
        send({{"t": "call", "n": channel().nonce, "id": 1, "op": "kv_set",
               "a": ["k", "v"], "app": "{other_app}", "app_id": "{other_app}"}})
        return ctx.kv.get("k")
    """)
    result = await executor.execute(make_request(source), mine)
    assert kind(result) is ExecErrorKind.PROTOCOL_VIOLATION
    assert mine.kv == {}
    assert other.kv == {}


async def test_forged_call_with_an_integer_too_long_for_json_is_the_scripts_error(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest
) -> None:
    """A worker that skips the worker-side checks and writes a call frame holding an
    int of 5000 digits itself gets ``invalid_input`` back (the host neither converts
    the digits nor trusts the worker to refuse them), and the worker is kept."""
    source = FORGE + textwrap.dedent("""
    def handle(e, ctx):
        ch = next(o for o in gc.get_objects() if type(o).__name__ == "Channel" and o.nonce)
        sys.set_int_max_str_digits(0)
        out = []
        for i, args in enumerate((["k", 10**5000], ["c", {"a": -10**5000}, 10, None]), 1000):
            send({"t": "call", "n": ch.nonce, "id": i, "op": "kv_set" if i == 1000 else
                  "docs_query", "a": args, "sp": False, "ts": 0.0})
            reply = ch.read_frame()
            out.append([reply["id"], reply["t"], reply.get("code")])
        ctx.kv.set("after", 1)
        return [out, os.getpid()]
    """)
    result = await executor.execute(make_request(source), host)
    out, pid = body(result)  # type: ignore[misc]
    assert out == [[1000, "err", "invalid_input"], [1001, "err", "invalid_input"]]
    assert host.kv == {"after": 1}
    again = await executor.execute(make_request(source), host)
    assert body(again)[1] == pid  # type: ignore[index]


async def test_forged_frame_of_another_execution_is_protocol_violation(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest
) -> None:
    """A frame carrying another execution's nonce is refused."""
    source = FORGE + textwrap.dedent("""
    def handle(e, ctx):
        send({"t": "done", "n": "0123456789abcdef", "ok": True,
              "resp": {"status": 200, "headers": [], "body": "forged", "body_encoding": "utf-8"}})
        import time
        time.sleep(0.5)
        return "real"
    """)
    result = await executor.execute(make_request(source), host)
    assert kind(result) is ExecErrorKind.PROTOCOL_VIOLATION


async def test_forged_response_header_that_would_split_the_response_is_refused(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest
) -> None:
    """A worker that skips ``ctx.response``'s checks and sends a header with CR/LF
    itself gets a protocol violation, not a header in the HTTP answer."""
    source = FORGE + textwrap.dedent("""
    def handle(e, ctx):
        send({"t": "done", "n": channel().nonce, "ok": True,
              "resp": {"status": 200, "headers": [["X-A", "1\\r\\nSet-Cookie: s=1"]],
                       "body": "", "body_encoding": "utf-8"}})
        import time
        time.sleep(0.5)
    """)
    result = await executor.execute(make_request(source), host)
    assert kind(result) is ExecErrorKind.PROTOCOL_VIOLATION


async def test_forged_response_with_too_many_headers_is_refused(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest
) -> None:
    """A forged ``done`` past ``MAX_HEADERS`` (each header fine) is a protocol
    violation: the host checks the count itself."""
    source = FORGE + textwrap.dedent("""
    def handle(e, ctx):
        send({"t": "done", "n": channel().nonce, "ok": True,
              "resp": {"status": 200, "headers": [["X-A", "1"]] * 5000,
                       "body": "", "body_encoding": "utf-8"}})
        import time
        time.sleep(0.5)
    """)
    result = await executor.execute(make_request(source), host)
    assert kind(result) is ExecErrorKind.PROTOCOL_VIOLATION


async def test_forged_informational_status_is_refused(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest
) -> None:
    """A forged ``done`` with a 101 (switch protocols) is a protocol violation."""
    source = FORGE + textwrap.dedent("""
    def handle(e, ctx):
        send({"t": "done", "n": channel().nonce, "ok": True,
              "resp": {"status": 101, "headers": [["upgrade", "websocket"]],
                       "body": "", "body_encoding": "utf-8"}})
        import time
        time.sleep(0.5)
    """)
    result = await executor.execute(make_request(source), host)
    assert kind(result) is ExecErrorKind.PROTOCOL_VIOLATION


async def test_garbage_on_the_host_pipe_is_protocol_violation(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest
) -> None:
    """An oversized frame header or non-JSON bytes kill the worker, not the host."""
    source = FORGE + textwrap.dedent("""
    def handle(e, ctx):
        wfd = int(sys.argv[sys.argv.index("--wfd") + 1])
        os.write(wfd, b"\\xff\\xff\\xff\\xff" + b"junk" * 10)
        import time
        time.sleep(0.5)
    """)
    result = await executor.execute(make_request(source), host)
    assert kind(result) is ExecErrorKind.PROTOCOL_VIOLATION
    ok = await executor.execute(make_request("def handle(e, ctx):\n    return 1\n"), host)
    assert body(ok) == 1


async def test_code_planted_in_a_worker_never_meets_executions_with_more_data_rights(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest
) -> None:
    """A script saved by a member who may not read data patches its worker's script
    API to record every later execution's context: executions of the same app with
    more data rights (the owner's scripts) run in other workers, so it records only
    its own; the same app's executions with the same rights share its worker."""
    plant = textwrap.dedent("""
    import builtins, os, sys
    api = sys.modules["executor_core.script_api"]
    if not hasattr(builtins, "SEEN"):
        builtins.SEEN = []
        real = api.Context.__init__
        def spy(self, *args, **kw):
            real(self, *args, **kw)
            builtins.SEEN.append(self.execution_id)
        api.Context.__init__ = spy
    def handle(e, ctx):
        return [list(builtins.SEEN), os.getpid()]
    """)
    victim = "import os\ndef handle(e, ctx):\n    return os.getpid()\n"
    app = new_app()

    def with_rights(request: ExecRequest, *names: str) -> ExecRequest:
        rights = frozenset(Capability(n) for n in names)
        return attrs.evolve(request, principal=attrs.evolve(request.principal, capabilities=rights))

    mallory = with_rights(make_request(plant, app_id=app))
    seen, pid = body(await executor.execute(mallory, host))  # type: ignore[misc]
    owner_run = make_request(victim, app_id=app)  # every capability
    owner_pid = body(await executor.execute(owner_run, host))
    peer_run = with_rights(make_request(victim, app_id=app), "app_read")
    peer_pid = body(await executor.execute(peer_run, host))
    seen, pid2 = body(await executor.execute(with_rights(make_request(plant, app_id=app)), host))  # type: ignore[misc]
    assert owner_pid != pid
    assert str(owner_run.execution_id) not in seen
    assert (peer_pid, pid2) == (pid, pid)  # same rights: one worker, nothing to gain
    assert str(peer_run.execution_id) in seen


FLOOD = """
import gc, json, os, struct, threading, time
def frame(channel, body):
    data = json.dumps({**body, "n": channel.nonce}).encode()
    return struct.pack(">I", len(data)) + data
def flood(channel, first, frames, wait=0.0):
    # Stop reading the host's replies (a host call whose reply is never read), then
    # write frames the host has no time to take.
    time.sleep(wait)
    for i in range(first, first + 2000):
        os.write(channel.wfd, frame(channel, {"t": "call", "id": i, "op": "kv_get",
                                              "a": [""], "sp": False, "ts": 0.0}))
    big = frame(channel, {"t": "log", "line": "a" * (8 * 1024 * 1024 - 100)})
    for _ in range(frames):
        view = memoryview(big)
        while view:
            view = view[os.write(channel.wfd, view):]
def handle(e, ctx):
    channel = next(o for o in gc.get_objects() if type(o).__name__ == "Channel" and o.nonce)
    if e.get("later"):
        threading.Thread(target=flood, args=(channel, 1, 6, 0.3), daemon=True).start()
        return os.getpid()
    flood(channel, 1, 6)
    time.sleep(30)
"""


async def test_a_worker_that_writes_while_the_host_cannot_read_is_stopped(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest
) -> None:
    """The host blocks on a reply the worker never reads while the worker keeps
    writing 8 MiB frames: what the host holds unread is bounded (the worker is
    stopped), not the server's memory filling until the deadline."""
    started = time.monotonic()
    result = await executor.execute(make_request(FLOOD, timeout_seconds=30), host)
    assert result.error is not None
    assert result.error.kind in {ExecErrorKind.PROTOCOL_VIOLATION, ExecErrorKind.WORKER_CRASH}
    assert time.monotonic() - started < 20


async def test_a_worker_that_writes_after_its_execution_is_stopped(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest
) -> None:
    """A thread left behind floods the pipe while nobody reads it (the worker is
    idle, warm for its app): the worker is killed, not kept with 48 MiB queued."""
    pid = body(await executor.execute(make_request(FLOOD, {"later": True}), host))
    deadline = time.monotonic() + 15
    while any(w.pid == pid and w.usable for w in executor.pool.idle_workers()):
        assert time.monotonic() < deadline, "the flooding worker is still warm"
        await anyio.sleep(0.05)
    again = body(
        await executor.execute(
            make_request("import os\ndef handle(e, ctx):\n    return os.getpid()\n"), host
        )
    )
    assert again != pid


async def test_a_worker_that_keeps_computing_after_its_execution_is_stopped(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest
) -> None:
    """Threads the script leaves spinning after ``handle`` returned run outside any
    deadline or CPU limit of an execution: the idle worker is stopped within about a
    second, and its CPU use ends with it. A worker idle for real is left alone."""
    source = src("""
    import os, threading, time
    def spin():
        while True:
            pass
    def handle(e, ctx):
        if e.get("spin"):
            for _ in range(2):
                threading.Thread(target=spin, daemon=True).start()
        return os.getpid()
    """)
    quiet = body(await executor.execute(make_request(source, app_id=new_app()), host))
    busy = body(await executor.execute(make_request(source, {"spin": True}), host))
    deadline = time.monotonic() + 5
    while any(w.pid == busy for w in executor.pool.idle_workers()):
        assert time.monotonic() < deadline, "the spinning worker is still idle and warm"
        await anyio.sleep(0.05)
    assert executor.pool.busy_idle_stopped == 1
    assert quiet in [w.pid for w in executor.pool.idle_workers()]


async def test_module_globals_do_not_cross_apps(
    executor: ProcessExecutor, host: MemoryHostApi, make_request: MakeRequest
) -> None:
    """State one app's script leaves in its interpreter is invisible to another app."""
    source = textwrap.dedent("""
    import builtins, os, sys
    SEEN = []
    def handle(e, ctx):
        found = [getattr(builtins, "LEAK", None), list(SEEN), "leak_mod" in sys.modules]
        if e.get("plant"):
            builtins.LEAK = e["plant"]
            SEEN.append(e["plant"])
            sys.modules["leak_mod"] = sys
            with open("planted.txt", "w") as f:
                f.write("x")
        return [found, os.getpid(), os.listdir(".")]
    """)
    request_a = make_request(source, {"plant": "app-a-secret"}, app_id=new_app())
    a = body(await executor.execute(request_a, host))
    b_request = make_request(source, {}, app_id=new_app(), script_id=request_a.script_id)
    found_b, pid_b, files_b = body(await executor.execute(b_request, host))  # type: ignore[misc]
    assert isinstance(a, list)
    assert found_b == [None, [], False]
    assert pid_b != a[1]
    assert files_b == []
    again_a = body(
        await executor.execute(
            make_request(source, {}, app_id=request_a.app_id, script_id=request_a.script_id), host
        )
    )
    assert again_a[0] == ["app-a-secret", ["app-a-secret"], True]  # type: ignore[index]
