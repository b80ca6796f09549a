"""Migrations run one at a time: processes that migrate one database together take
turns on PostgreSQL's advisory lock ``migrations.MIGRATION_LOCK_KEY``; the first
migrates, the others find the schema at head. A wait is bounded and said once, and a
migration that cannot be done is one line from ``picloud migrate`` and ``picloud serve``.

The tests hold the lock from their own connection while the migrators start, so that
all of them are at the starting line when it is released: without the lock the
migrators would run into each other at once.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

import pytest
from alembic import command
from sqlalchemy import Connection, Engine, create_engine, pool, text

from picloud import migrations
from picloud.runtime import StartupError
from tests.app.server import PICLOUD, ROOT
from tests.pg import PgServer

MIGRATORS = 4
ROUNDS = 3
LINE_TIMEOUT = 30.0

# A migrator process: imports everything, says "ready", then migrates each database
# URL it reads from stdin, answering "waiting" when it has to wait for the lock and
# "ok RUNS" (RUNS: the migrations it ran itself) or "error WHY" when done.
MIGRATOR = """
import logging, sys
from picloud import migrations

runs = []

class Waiting(logging.Handler):
    def emit(self, record):
        print("waiting", flush=True)

class Runs(logging.Handler):
    def emit(self, record):
        if record.getMessage().startswith("Running upgrade"):
            runs.append(record)

logging.getLogger("picloud.migrations").addHandler(Waiting())
alembic_log = logging.getLogger("alembic.runtime.migration")
alembic_log.setLevel(logging.INFO)
alembic_log.addHandler(Runs())
print("ready", flush=True)
for line in sys.stdin:
    runs.clear()
    try:
        migrations.upgrade(line.strip())
    except BaseException as exc:
        print("error", " ".join(str(exc).split())[:500], flush=True)
    else:
        print("ok", len(runs), flush=True)
"""


def _engine(url: str) -> Engine:
    return create_engine(url, poolclass=pool.NullPool, isolation_level="AUTOCOMMIT")


@contextmanager
def _held_lock(url: str) -> Iterator[tuple[Connection, int]]:
    """Hold the migration lock from a connection of our own; yields it and its
    backend pid. Released when the block ends (or by the caller, sooner)."""
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            pid = int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())
            assert conn.execute(
                text("SELECT pg_try_advisory_lock(:key)"), {"key": migrations.MIGRATION_LOCK_KEY}
            ).scalar_one()
            yield conn, pid
    finally:
        engine.dispose()


def _release(conn: Connection) -> None:
    conn.execute(text("SELECT pg_advisory_unlock_all()"))


def _versions(url: str) -> list[str]:
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            if conn.execute(text("SELECT to_regclass('alembic_version')")).scalar() is None:
                return []
            return list(conn.execute(text("SELECT version_num FROM alembic_version")).scalars())
    finally:
        engine.dispose()


def _history() -> list[str]:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(migrations.alembic_config())
    return [rev.revision for rev in script.walk_revisions()]


class _Lines:
    """The lines a subprocess writes to one of its pipes, read by a thread."""

    def __init__(self, stream: IO[str] | None) -> None:
        assert stream is not None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._reader.start()

    def _read(self, stream: IO[str]) -> None:
        try:
            for line in stream:
                self._lines.put(line.rstrip("\n"))
        finally:
            stream.close()
            self._lines.put(None)

    def join(self) -> None:
        """Once the process has ended: wait for the pipe's close, and add the lines not
        taken yet to ``seen``."""
        self._reader.join(LINE_TIMEOUT)
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                return
            if line is not None:
                self.seen.append(line)

    def next(self, timeout: float = LINE_TIMEOUT) -> str:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line within {timeout} s after {self.seen}") from None
        assert line is not None, f"the process ended after {self.seen}"
        self.seen.append(line)
        return line


def test_migrators_that_start_together_take_turns(pg_server: PgServer) -> None:
    """Four processes migrate one empty database at the same instant, three times over
    (a fresh database each round): every one succeeds, exactly one of them runs the
    migrations, and alembic_version holds the head once."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", MIGRATOR],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for _ in range(MIGRATORS)
    ]
    outs = [_Lines(proc.stdout) for proc in procs]
    try:
        for out in outs:
            assert out.next() == "ready"
        for _ in range(ROUNDS):
            name = pg_server.create_database(prefix="empty")
            url = pg_server.url(name)
            try:
                with _held_lock(url) as (conn, _):
                    for proc in procs:  # all of them start while the lock is held
                        assert proc.stdin is not None
                        proc.stdin.write(url + "\n")
                        proc.stdin.flush()
                    firsts = [out.next() for out in outs]
                    _release(conn)  # and all of them go for it at once
                results = [
                    out.next() if first == "waiting" else first
                    for first, out in zip(firsts, outs, strict=True)
                ]
                assert [r.split()[0] for r in results] == ["ok"] * MIGRATORS, results
                runs = sorted(int(r.split()[1]) for r in results)
                assert runs == [0] * (MIGRATORS - 1) + [len(_history())], results
                assert _versions(url) == list(migrations.heads())
            finally:
                pg_server.drop_database(name)
    finally:
        for proc in procs:
            if proc.stdin is not None:
                proc.stdin.close()  # its loop ends: it exits
        for proc, out in zip(procs, outs, strict=True):
            try:
                proc.wait(LINE_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            out.join()


def test_a_migrator_waits_for_the_holder_then_finds_the_schema_at_head(
    empty_db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """While another session holds the lock (and migrates), a migrator says once that
    it waits and for whom, and touches nothing; once the lock is released it proceeds,
    finds the schema at head and runs no migration itself."""
    caplog.set_level(logging.INFO)
    failure: list[BaseException] = []

    def migrate() -> None:
        try:
            migrations.upgrade(empty_db_url)
        except BaseException as exc:  # reported by the test
            failure.append(exc)

    waiter = threading.Thread(target=migrate, name="waiter")
    with _held_lock(empty_db_url) as (conn, pid):
        waiter.start()
        deadline = time.monotonic() + LINE_TIMEOUT
        while not _waiting(caplog) and waiter.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [r.getMessage() for r in _waiting(caplog)] == [
            f"another process is migrating the database (PostgreSQL backend pid {pid}):"
            f" waiting for it, at most {migrations.MIGRATION_LOCK_WAIT_SECONDS:g} s"
        ], failure
        time.sleep(0.3)  # it keeps waiting, and says so only once
        assert waiter.is_alive()
        assert len(_waiting(caplog)) == 1
        assert _versions(empty_db_url) == []
        # The holder migrates, as a migrator holding the lock does (alembic is not
        # thread-safe, but the waiter does not touch it before it has the lock).
        config = migrations.alembic_config()
        conn.commit()  # (AUTOCOMMIT's) so that the isolation level may change
        with conn.execution_options(isolation_level="READ COMMITTED").begin():
            config.attributes["connection"] = conn
            command.upgrade(config, "head")
        conn.execution_options(isolation_level="AUTOCOMMIT")
        _release(conn)
        waiter.join(LINE_TIMEOUT)
    assert not waiter.is_alive()
    assert failure == []
    assert _versions(empty_db_url) == list(migrations.heads())
    ran = [r for r in caplog.records if r.getMessage().startswith("Running upgrade")]
    assert ran, "the holder ran the migrations"
    assert [r for r in ran if r.threadName == "waiter"] == []


def _waiting(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "picloud.migrations"]


def test_a_migrator_gives_up_after_its_wait_in_one_line(empty_db_url: str) -> None:
    """A lock held for longer than the migrator waits: StartupError, one line naming
    the holder's backend pid; nothing migrated."""
    with _held_lock(empty_db_url) as (_, pid):
        began = time.monotonic()
        with pytest.raises(StartupError) as raised:
            migrations.upgrade(empty_db_url, lock_wait_seconds=0.5)
        waited = time.monotonic() - began
    message = str(raised.value)
    assert message.startswith("cannot migrate the database at "), message
    assert (
        f"another process has held the migration lock for 0.5 s (PostgreSQL backend pid {pid})"
        in message
    )
    assert "\n" not in message
    assert 0.5 <= waited < 5
    assert _versions(empty_db_url) == []


def _picloud(*args: str, **env: str) -> subprocess.Popen[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PICLOUD_")}
    return subprocess.Popen(
        [str(PICLOUD), *args],
        env={**clean, **env},
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_picloud_migrate_runs_together_wait_then_succeed(empty_db_url: str) -> None:
    """Three `picloud migrate` started together behind a held lock: each says in one
    line that it waits, and once the lock is released each exits 0 saying it migrated;
    the database is at head once."""
    with _held_lock(empty_db_url) as (conn, pid):
        procs = [_picloud("migrate", PICLOUD_DATABASE_URL=empty_db_url) for _ in range(3)]
        errs = [_Lines(proc.stderr) for proc in procs]
        try:
            for err in errs:
                line = err.next()
                assert line == (
                    f"another process is migrating the database (PostgreSQL backend pid {pid}):"
                    f" waiting for it, at most {migrations.MIGRATION_LOCK_WAIT_SECONDS:g} s"
                ), err.seen
            _release(conn)
            for proc, err in zip(procs, errs, strict=True):
                assert proc.wait(LINE_TIMEOUT) == 0, err.seen
                assert err.next() == "picloud migrate: database migrated to head"
        finally:
            for proc, err in zip(procs, errs, strict=True):
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
                err.join()
    assert _versions(empty_db_url) == list(migrations.heads())


@pytest.mark.parametrize("command_name", ["migrate", "serve"])
def test_a_migration_that_fails_is_one_line(command_name: str, db_url: str) -> None:
    """A database at a revision this picloud does not know (a newer picloud migrated
    it): `picloud migrate` and `picloud serve` exit 1 with one line saying so, no
    traceback."""
    engine = _engine(db_url)
    try:
        with engine.connect() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    finally:
        engine.dispose()
    args = ["serve", "--port", "0"] if command_name == "serve" else ["migrate"]
    proc = _picloud(*args, PICLOUD_DATABASE_URL=db_url)
    try:
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, stderr
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    if command_name == "migrate":
        assert len(lines) == 1, stderr
    assert lines[-1].startswith(f"picloud {command_name}: cannot migrate the database at "), stderr
    assert lines[-1].endswith("Can't locate revision identified by '9999'"), stderr


def test_the_alembic_command_takes_the_lock_too(empty_db_url: str) -> None:
    """`alembic upgrade head` (env.py's own connection) waits for the lock as well."""
    alembic = [str(PICLOUD.with_name("alembic")), "-x", f"url={empty_db_url}", "upgrade", "head"]
    with _held_lock(empty_db_url) as (conn, pid):
        proc = subprocess.Popen(
            alembic, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        err = _Lines(proc.stderr)
        try:
            assert err.next().endswith(  # alembic.ini's format: "WARNI [logger] message"
                "[picloud.migrations] another process is migrating the database"
                f" (PostgreSQL backend pid {pid}): waiting for it, at most"
                f" {migrations.MIGRATION_LOCK_WAIT_SECONDS:g} s"
            )
            assert proc.poll() is None
            assert _versions(empty_db_url) == []
            _release(conn)
            assert proc.wait(LINE_TIMEOUT) == 0, err.seen
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            err.join()
    assert _versions(empty_db_url) == list(migrations.heads())


def test_a_node_waiting_for_the_lock_stops_on_sigterm(empty_db_url: str) -> None:
    """`picloud serve` waiting for another's migration says so in its log, and SIGTERM
    stops it as at any other moment of its start: status 0, nothing migrated."""
    with _held_lock(empty_db_url) as (_, pid):
        proc = _picloud("serve", "--port", "0", PICLOUD_DATABASE_URL=empty_db_url)
        err = _Lines(proc.stderr)
        try:
            while "picloud.migrations" not in err.next():
                pass
            assert err.seen[-1].endswith(
                f"WARNING picloud.migrations: another process is migrating the database"
                f" (PostgreSQL backend pid {pid}): waiting for it, at most"
                f" {migrations.MIGRATION_LOCK_WAIT_SECONDS:g} s"
            )
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(LINE_TIMEOUT) == 0, err.seen
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            err.join()
        assert err.seen[-1] == "picloud serve: stopped before it served", err.seen
        assert _versions(empty_db_url) == []
