"""The embedded PostgreSQL is started again when it dies under a running node, and a
node whose PostgreSQL cannot be kept up stops with status 1 (``picloud.pg_watch``)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from picloud.embedded_pg import TEST_SETTINGS, EmbeddedPostgres, become_subreaper
from picloud.pg_watch import PgWatch
from tests.app.server import PICLOUD, ROOT, free_port
from tests.app.test_embedded_pg import _execute, _scalar
from tests.app.test_serve_embedded import stop, wait_ready

TOKEN = "pc_test_watch_0123456789abcdef"
COUNTER = """
def handle(event, ctx):
    n = (ctx.kv.get("n") or 0) + 1
    ctx.kv.set("n", n)
    return {"n": n}
"""


def start(data_dir: Path, port: int, log: Path, **env: str) -> subprocess.Popen[bytes]:
    """``picloud serve`` on an embedded PostgreSQL in ``data_dir``."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PICLOUD_")}
    environ |= {"PICLOUD_DATA_DIR": str(data_dir), "PICLOUD_PORT": str(port)}
    environ |= {"PICLOUD_ADMIN_TOKEN": TOKEN, **env}
    with log.open("ab") as out:
        return subprocess.Popen(
            [str(PICLOUD), "serve"], cwd=ROOT, env=environ, stdout=out, stderr=out
        )


def kill_postmaster(data_dir: Path) -> int:
    pid = int((data_dir / "postmaster.pid").read_text().split()[0])
    os.kill(pid, signal.SIGKILL)
    return pid


def _wait(predicate: object, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@contextmanager
def watched(pg: EmbeddedPostgres, **kwargs: float) -> Iterator[tuple[PgWatch, list[str]]]:
    lost: list[str] = []
    watch = PgWatch(pg, lost.append, interval=0.1, **kwargs)  # type: ignore[arg-type]
    watch.start()
    try:
        yield watch, lost
    finally:
        watch.stop()


@pytest.fixture(autouse=True)
def _reaper() -> None:
    """As ``picloud serve`` does before it starts a server it watches (this test
    process keeps being the reaper of what it starts afterwards: harmless)."""
    assert become_subreaper()


def test_a_killed_server_is_started_again_until_it_dies_too_often(pg_data_dir: Path) -> None:
    """Killed once: started again where it listened, committed data kept. Killed once
    more than ``max_restarts`` allows within the window: ``on_lost`` says why."""
    data_dir = pg_data_dir / "pg"
    with EmbeddedPostgres(data_dir) as pg:  # durable: a commit survives the kill
        url = pg.url("postgres")
        _execute(url, "CREATE TABLE kept (x int); INSERT INTO kept VALUES (7)")
        with watched(pg, max_restarts=1) as (watch, lost):
            first = kill_postmaster(data_dir)
            _wait(lambda: watch.restarts == 1)
            assert pg.alive()
            assert int((data_dir / "postmaster.pid").read_text().split()[0]) != first
            assert pg.url("postgres") == url  # the same socket: open URLs stay valid
            assert _scalar(url, "SELECT x FROM kept") == 7
            kill_postmaster(data_dir)
            _wait(lambda: bool(lost))
        assert lost == ["it stopped again after 1 restarts within 600 s"]
        assert watch.restarts == 1
        assert not pg.alive()


def test_a_server_that_cannot_start_again_is_given_up(pg_data_dir: Path) -> None:
    """A server that does not come back within ``give_up_after`` is given up, with the
    reason; with ``max_restarts`` 0 the first death is."""
    data_dir = pg_data_dir / "pg"
    with EmbeddedPostgres(data_dir, settings=TEST_SETTINGS) as pg:
        with watched(pg, give_up_after=1.0) as (watch, lost):
            kill_postmaster(data_dir)
            data_dir.chmod(0)  # PostgreSQL (and pg_ctl) can no longer read its cluster
            try:
                _wait(lambda: bool(lost))
            finally:
                data_dir.chmod(0o700)
        assert lost[0].startswith("it could not be started again within 1 s"), lost
        assert watch.restarts == 0
        pg.restart()  # readable again: the owner can still start it by hand
        with watched(pg, max_restarts=0) as (watch, lost):
            kill_postmaster(data_dir)
            _wait(lambda: bool(lost))
        assert lost == ["it stopped, and restarting it is off (PICLOUD_EMBEDDED_PG_RESTARTS=0)"]
        assert not pg.alive()


def test_stopping_the_watch_leaves_a_stopped_server_stopped(pg_data_dir: Path) -> None:
    """The watch is stopped before the server is stopped on purpose: it must not bring
    the server back (nor hang) once told to stop."""
    pg = EmbeddedPostgres(pg_data_dir / "pg", settings=TEST_SETTINGS).start()
    with watched(pg) as (watch, lost):
        pass
    pg.stop()
    time.sleep(0.3)
    assert not (pg_data_dir / "pg" / "postmaster.pid").exists()
    assert watch.restarts == 0
    assert lost == []


def _client(port: int) -> httpx.Client:
    return httpx.Client(
        base_url=f"http://127.0.0.1:{port}",
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=30,
    )


def test_serve_starts_its_killed_postgresql_again_then_stops_with_status_1(
    pg_data_dir: Path,
) -> None:
    """`picloud serve`: its embedded PostgreSQL killed, the node serves again within
    seconds, on the same data. Killed once more than PICLOUD_EMBEDDED_PG_RESTARTS
    allows, the node stops with status 1 and the reason, for a service manager to act
    on."""
    log, port = pg_data_dir / "serve.log", free_port()
    proc = start(pg_data_dir, port, log, PICLOUD_EMBEDDED_PG_RESTARTS="1")
    try:
        wait_ready(proc, port, log)
        with _client(port) as c:
            app = c.post("/api/v1/admin/apps", json={"name": "watched"}).json()["id"]
            base = f"/api/v1/admin/apps/{app}"
            c.post(f"{base}/scripts", json={"name": "count", "source": COUNTER})
            r = c.post(f"{base}/routes", json={"method": "POST", "path": "/n", "script": "count"})
            assert r.status_code == 201, r.text
            assert c.post("/apps/watched/n").json() == {"n": 1}
            kill_postmaster(pg_data_dir / "pg")
            wait_ready(proc, port, log)
            answers = []
            for _ in range(20):  # the first requests may still meet a broken connection
                answers.append(c.post("/apps/watched/n"))
                if answers[-1].status_code == 200:
                    break
                time.sleep(0.2)
            assert answers[-1].json() == {"n": 2}, [a.text for a in answers]
            assert {a.status_code for a in answers} <= {200, 500, 503}
        assert "embedded PostgreSQL is running again" in log.read_text()
        kill_postmaster(pg_data_dir / "pg")
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            stop(proc)
    text_ = log.read_text()
    assert code == 1, text_
    assert "picloud serve: embedded PostgreSQL lost: it stopped again after 1 restarts" in text_
    assert not (pg_data_dir / "pg.lock").exists() or proc.returncode == 1


def test_a_stopped_server_leaves_no_zombie_behind(pg_data_dir: Path) -> None:
    """The reaper is the postmaster's parent: ``stop`` reaps it (before, it stayed a
    zombie until the process that stopped it exited)."""
    pg = EmbeddedPostgres(pg_data_dir / "pg", settings=TEST_SETTINGS).start()
    postmaster = int((pg_data_dir / "pg" / "postmaster.pid").read_text().split()[0])
    assert Path(f"/proc/{postmaster}").exists()
    pg.stop()
    assert not Path(f"/proc/{postmaster}").exists()
