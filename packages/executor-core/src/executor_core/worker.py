"""The worker bootstrap: ``python -I -m executor_core.worker --rfd R --wfd W ...``.

Started by the pool with an empty environment, no inherited descriptors but the
two pipe ends, its own session and a fresh scratch directory as cwd. Before any
user code it sizes what a thread costs (:func:`thread_budget`), applies every
sandbox layer (:mod:`executor_core.sandbox`), then reports ``ready`` and serves
``exec`` frames one at a time until its input closes.

Compiled scripts are cached per ``script_id@version``: the module body runs once
per worker (like a warm Lambda container), ``handle`` is called per execution.
The worker belongs to one tenant (an app, with one set of data rights) for its
whole life, so module globals never cross apps.
"""

from __future__ import annotations

import _thread
import ctypes
import math
import os
import resource
import signal
import sys
import time
from typing import TYPE_CHECKING

from executor_core import sandbox, script_api
from picloud_shared.limits import MAX_MESSAGE_CHARS, MAX_TRACEBACK_CHARS

if TYPE_CHECKING:
    import traceback
    from typing import Any

_HOST_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class _BadSyntax(Exception):
    pass


class _MissingHandler(Exception):
    pass


class _NoSource(Exception):
    pass


class _State:
    in_script = False


def _on_sigxcpu(signum: int, frame: Any) -> None:
    if _State.in_script:
        raise script_api.CpuLimit("CPU time limit exceeded")


def _cpu_used() -> float:
    """Process CPU time (all threads), what RLIMIT_CPU counts."""
    return time.clock_gettime(time.CLOCK_PROCESS_CPUTIME_ID)


def _strip_host_frames(te: traceback.TracebackException | None, seen: set[int]) -> None:
    """Drop the executor's frames; name the library frames left from their library's
    root (``<python>/json/decoder.py``), not by the host's paths."""
    while te is not None and id(te) not in seen:
        seen.add(id(te))
        te.stack[:] = [f for f in te.stack if not f.filename.startswith(_HOST_DIR)]
        # A huge message is cut here, so that the traceback (kept by its end) still
        # shows its frames and the exception's type, not only the message's tail.
        text = getattr(te, "_str", None)
        if isinstance(text, str) and len(text) > MAX_MESSAGE_CHARS:
            te._str = (
                text[:MAX_MESSAGE_CHARS] + f" … [{len(text) - MAX_MESSAGE_CHARS} more characters]"
            )
        for frame in te.stack:
            _ = frame.line  # read from the real file before it is renamed
            frame.filename = _public_filename(frame.filename)
        _strip_host_frames(te.__cause__, seen)
        te = te.__context__


def _public_filename(filename: str) -> str:
    if filename.startswith("<"):  # a script (<script …>) or <string>, <frozen …>
        return filename
    for root, label in _library_roots():
        if filename.startswith(root):
            return label + "/" + filename[len(root) :]
    return "<file>/" + os.path.basename(filename)


_ROOTS: list[tuple[str, str]] = []
_REROOTED: dict[str, str] = {}  # /proc/self/fd/N → the directory (reroot_sys_path)


def _library_roots() -> list[tuple[str, str]]:
    """(directory with a trailing separator, label), most specific first: the
    installation's library directories, by their paths and by the descriptors
    ``reroot_sys_path`` named them with."""
    if not _ROOTS:
        import sysconfig

        paths = sysconfig.get_paths()
        found = {paths[k]: "<site-packages>" for k in ("purelib", "platlib") if k in paths}
        found |= {paths[k]: "<python>" for k in ("stdlib", "platstdlib") if k in paths}
        roots = sorted(
            ((os.path.join(root, ""), label) for root, label in found.items()),
            key=lambda pair: -len(pair[0]),
        )

        def label_of(directory: str) -> str | None:
            directory = os.path.join(directory, "")
            for root, label in roots:
                if directory.startswith(root):
                    return (label + "/" + directory[len(root) :]).rstrip("/")
            return None

        for new, old in _REROOTED.items():
            label = label_of(old)
            if label is not None:
                roots.append((os.path.join(new, ""), label))
        _ROOTS.extend(sorted(roots, key=lambda pair: -len(pair[0])))
    return _ROOTS


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    seen: set[int] = set()  # by identity: a script's __eq__ is not asked
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen and len(out) < 50:
        out.append(cur)
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return out


_SOURCES: dict[str, str] = {}


def _register_sources() -> None:
    """Let tracebacks show script lines (linecache is imported only on failure)."""
    import linecache

    for filename, source in _SOURCES.items():
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)


def classify(exc: BaseException) -> tuple[str, str, str | None]:
    """(kind, message, script traceback) for an exception out of the script, as text
    a frame can carry: cut to size, half a surrogate pair as U+FFFD, and whatever the
    script's ``__str__`` does (raise, return no ``str``) an ``<unprintable E>``."""
    try:
        kind, msg, tb = _classify(exc)
    except BaseException:  # the script's own code ran (a __str__, a property): its error
        kind, msg, tb = "uncaught_exception", "<unprintable exception>", None
    # Cut here, not on the host: a 10 MB message would not fit in a frame.
    msg = script_api.safe_text(msg[:MAX_MESSAGE_CHARS])
    tb = None if tb is None else script_api.safe_text(tb[-MAX_TRACEBACK_CHARS:])
    return kind, msg, tb


def _classify(exc: BaseException) -> tuple[str, str, str | None]:
    text = script_api.describe
    if isinstance(exc, script_api.Rejected):
        return "rejected", text(exc) or "rejected", None
    if isinstance(exc, script_api.OutputLimit):
        return "output_limit", text(exc), None
    if isinstance(exc, script_api.ResponseTooLarge):
        return "output_limit", text(exc), None
    if isinstance(exc, script_api.CpuLimit):
        return "cpu_limit", text(exc), None
    if isinstance(exc, script_api.InvalidReturn):
        return "invalid_return", text(exc), None
    chain = _chain(exc)
    message = f"{type(exc).__name__}: {text(exc)}"
    if any(isinstance(e, MemoryError) for e in chain):
        return "memory_limit", "memory limit exceeded", None
    if any(isinstance(e, OSError) and e.errno == 27 for e in chain):  # EFBIG
        return "file_size_limit", "file size limit exceeded", None
    try:
        import traceback

        _register_sources()
        te = traceback.TracebackException.from_exception(exc)
        _strip_host_frames(te, set())
        tb = "".join(te.format())
    except Exception:  # pragma: no cover - formatting must never take the worker down
        tb = message
    return "uncaught_exception", message, tb


class Worker:
    def __init__(self, rfd: int, wfd: int) -> None:
        self.channel = script_api.Channel(rfd, wfd)
        self.cache: dict[str, Any] = {}
        self.sources: dict[str, str] = {}
        self.writer = script_api.LogWriter(self.channel)
        self.cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
        if self.cpu_hard == resource.RLIM_INFINITY:
            self.cpu_hard = 1 << 40

    def serve(self) -> None:
        while True:
            try:
                frame = self.channel.read_frame(script_api.NEXT_EXEC)
            except script_api.FrameTooBig as exc:
                self.refuse(exc.nonce)
                continue
            if frame is None or frame.get("t") != "exec":
                return
            self.run(frame)

    def refuse(self, nonce: str) -> None:
        """Answer an ``exec`` whose event did not fit in the memory limit once decoded:
        the script's limit is too small for what it is given (``memory_limit``; the
        host retires this worker), not a crash of the platform's."""
        self.channel.start(nonce)
        done: dict[str, Any] = {"t": "done", "n": nonce, "ok": False, "kind": "memory_limit"}
        done["msg"] = (
            "the event does not fit in the script's memory limit (memory_limit_mb) once decoded"
        )
        self._finish(done, cached=False, has=False, used=_cpu_used())

    def _load(self, key: str, source: str | None) -> tuple[Any, bool]:
        handle = self.cache.get(key)
        if handle is not None:
            return handle, True
        if source is None:
            raise _NoSource("host sent no source for an uncached script")
        filename = f"<script {key}>"
        # A UTF-8 byte order mark (Windows editors write one) is no Python: drop it.
        # It is on the first line, so every line keeps its number.
        source = source.removeprefix("\ufeff")
        try:
            code = compile(source, filename, "exec", dont_inherit=True)
        except (SyntaxError, ValueError) as exc:
            raise _BadSyntax(f"{type(exc).__name__}: {exc}") from None
        _SOURCES[filename] = source
        namespace: dict[str, Any] = {"__name__": "__script__", "__file__": filename}
        exec(code, namespace)
        handle = namespace.get("handle")
        if handle is None or not callable(handle):
            raise _MissingHandler("the script defines no callable handle(event, ctx)")
        self.cache[key] = handle
        return handle, False

    def run(self, frame: dict[str, Any]) -> None:
        ch = self.channel
        ch.start(frame["n"])
        ch.set_spin(frame)
        mem = frame.get("mem")
        if mem is not None:
            sandbox.set_limit(resource.RLIMIT_AS, int(mem))
        # RLIMIT_CPU as a per-execution delta: CPU used so far plus this budget, in
        # whole seconds. The soft limit stays in place afterwards (an idle worker burns
        # at most a spin window) and the next execution moves it again, only if it
        # changed: a read, and a write at most once a second of CPU used.
        used = _cpu_used()
        cpu_soft = math.ceil(used + float(frame["cpu"]))
        limits = (min(cpu_soft, self.cpu_hard), self.cpu_hard)
        if resource.getrlimit(resource.RLIMIT_CPU) != limits:
            try:
                resource.setrlimit(resource.RLIMIT_CPU, limits)
            except ValueError:  # the script lowered the hard limit: keep it
                self.cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
                limits = (min(cpu_soft, self.cpu_hard), self.cpu_hard)
                resource.setrlimit(resource.RLIMIT_CPU, limits)
        done: dict[str, Any] = {"t": "done", "n": ch.nonce}
        cached = False
        saved = sys.stdout, sys.stderr
        self.writer.begin()
        sys.stdout = sys.stderr = self.writer
        _State.in_script = True
        try:
            try:
                handle, cached = self._load(frame["key"], frame.get("src"))
            except _BadSyntax as exc:
                done.update(ok=False, kind="syntax_error", msg=str(exc))
            except _MissingHandler as exc:
                done.update(ok=False, kind="missing_handler", msg=str(exc))
            except _NoSource as exc:
                done.update(ok=False, kind="internal", msg=str(exc))
            else:
                ctx = script_api.Context(ch, frame["ctx"])
                result = handle(frame["ev"], ctx)
                response = script_api.response_from_return(result)
                self.writer.flush()
                done.update(ok=True, resp=response.to_wire())
        except BaseException as exc:
            kind, msg, tb = classify(exc)
            done.update(ok=False, kind=kind, msg=msg, tb=tb)
        finally:
            _State.in_script = False
            sys.stdout, sys.stderr = saved
        self._finish(done, cached=cached, has=frame["key"] in self.cache, used=used)

    def _finish(self, done: dict[str, Any], *, cached: bool, has: bool, used: float) -> None:
        """Send the execution's ``done`` frame: whether its script came from the cache,
        whether the cache has it now, the CPU used as of its start (the host only
        tracks the lifetime budget), and the worker's polling hint."""
        done["cached"] = cached
        done["has"] = has
        done["cpu"] = used
        done["sp"] = self.channel.will_spin(script_api.NEXT_EXEC)
        done["ts"] = time.perf_counter()
        self.channel.finish(done)  # ends the execution: its ctx reaches the host no more


# What a script's thread costs in address space, which RLIMIT_AS (the memory limit)
# counts. First its malloc arena: glibc gives each new thread one of its own,
# reserving 64 MiB (HEAP_MAX). At the default 128 MiB (RLIMIT_AS 192 MiB, 15 MiB of
# it the idle worker) the first two threads took 72 MiB each, and a script could
# start 6 threads, not 31. With one arena all threads share the main heap; the GIL
# serializes them anyway, so they hardly contend for its lock.
M_ARENA_MAX = -8  # glibc's mallopt parameter
MALLOC_ARENAS = 1
# Then its stack, 8 MiB by default (RLIMIT_STACK). Measured on 3.11 at the default
# recursion limit (1000), inside a thread: plain Python recursion needs 64 KiB,
# recursion through C calls (__getattr__, map, __format__, a property) up to 768 KiB,
# and through ``sorted(key=...)`` (~2.5 KiB of C stack a level) 2.5 MiB. 4 MiB ends
# each as a RecursionError, not a segfault, with 60% to spare; at 2 MiB the sorted
# case kills the worker. 31 threads then reserve 124 MiB, and a script at the default
# limit running all of them still has about 50 MiB to allocate.
THREAD_STACK_BYTES = 4 * 1024 * 1024


def thread_budget() -> None:
    """One malloc arena, and :data:`THREAD_STACK_BYTES` stacks for the threads a
    script starts (a script may change it: ``threading.stack_size``), so that
    RLIMIT_NPROC bounds its threads before the memory limit does."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # glibc's; not every libc's
    if mallopt is not None:
        mallopt(M_ARENA_MAX, MALLOC_ARENAS)
    _thread.stack_size(THREAD_STACK_BYTES)


_INT_OPTIONS = (
    "rfd",
    "wfd",
    "address-space",
    "cpu",
    "fsize",
    "nofile",
    "nproc",
    "uid",
    "gid",
    "scratch-bytes",
)


def _parse(argv: list[str]) -> dict[str, Any]:
    """``--name value`` pairs (argparse would cost the cold start ~10 ms)."""
    if len(argv) % 2:
        raise SystemExit("usage: executor_core.worker --name value ...")
    out: dict[str, Any] = {}
    for name, value in zip(argv[::2], argv[1::2], strict=True):
        key = name.removeprefix("--")
        out[key.replace("-", "_")] = int(value) if key in _INT_OPTIONS else value
    return out


def reroot_sys_path() -> list[int]:
    """Reach the interpreter's own files through descriptors opened while still root.

    The interpreter may live under a directory the dropped uid cannot traverse
    (``/root/.pyenv``): each import directory is opened ``O_PATH`` now and named
    ``/proc/self/fd/N`` from then on, for ``sys.path`` and for every imported
    package's ``__path__``. Only the directories themselves become reachable.
    """
    fds: list[int] = []
    mapping: dict[str, str] = {}
    for entry in sys.path:
        if entry and os.path.isdir(entry) and entry not in mapping:
            fd = os.open(entry, sandbox.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            fds.append(fd)
            mapping[entry] = f"/proc/self/fd/{fd}"
            _REROOTED[mapping[entry]] = entry

    def moved(path: str) -> str:
        for old, new in mapping.items():
            if path == old or path.startswith(old + os.sep):
                return new + path[len(old) :]
        return path

    sys.path[:] = [moved(p) for p in sys.path]
    for module in list(sys.modules.values()):
        paths = getattr(module, "__path__", None)
        if isinstance(paths, list):
            paths[:] = [moved(p) for p in paths]
    sys.path_importer_cache.clear()
    return fds


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    ch = script_api.Channel(args["rfd"], args["wfd"])
    try:
        os.chdir(args["scratch"])
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death
        signal.signal(signal.SIGXCPU, _on_sigxcpu)
        thread_budget()
        readable = sandbox.readable_paths()  # before sys.path moves to /proc/self/fd
        if os.geteuid() == 0 and args.get("uid") is not None:
            reroot_sys_path()
        layers = sandbox.apply(
            readable=readable,
            scratch_bytes=args.get("scratch_bytes"),
            scratch=args["scratch"],
            uid=args.get("uid"),
            gid=args.get("gid"),
            address_space=args["address_space"],
            cpu_seconds=args["cpu"],
            file_size=args["fsize"],
            open_files=args["nofile"],
            processes=args["nproc"],
        )
        os.chdir(args["scratch"])  # the scratch tmpfs, now mounted over the directory
    except Exception as exc:
        ch.send({"t": "ready", "ok": False, "error": f"{type(exc).__name__}: {exc}"})
        return 1
    ch.send({"t": "ready", "ok": True, "pid": os.getpid(), "layers": layers})
    Worker(args["rfd"], args["wfd"]).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
