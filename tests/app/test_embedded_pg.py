"""EmbeddedPostgres: initdb once, reuse, settings, TCP, clean idempotent stop."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, pool, text

from picloud.embedded_pg import (
    TEST_SETTINGS,
    EmbeddedPostgres,
    EmbeddedPostgresError,
    reap_dead_children,
)


def _scalar(url: str, sql: str) -> object:
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            return conn.execute(text(sql)).scalar()
    finally:
        engine.dispose()


def _execute(url: str, sql: str) -> None:
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.begin() as conn:
            conn.execute(text(sql))
    finally:
        engine.dispose()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_start_query_stop_and_restart_reuses_the_cluster(pg_data_dir: Path) -> None:
    """A second start reuses the initialised cluster and its data; stop is idempotent."""
    data_dir = pg_data_dir / "pg"
    with EmbeddedPostgres(data_dir, settings=TEST_SETTINGS) as pg:
        url = pg.url("postgres")
        assert url.startswith("postgresql+psycopg://")
        assert len(str(pg.socket_dir)) < 60
        assert _scalar(url, "SHOW fsync") == "off"
        assert _scalar(url, "SHOW max_connections") == "300"
        assert _scalar(url, "SHOW listen_addresses") == ""
        _execute(url, "CREATE TABLE kept (x int)")
        socket_dir = pg.socket_dir
    assert not pg.running
    assert socket_dir is not None
    assert not socket_dir.exists()
    assert not (data_dir / "postmaster.pid").exists()
    pg.stop()  # idempotent

    pg2 = EmbeddedPostgres(data_dir).start()
    try:
        assert _scalar(pg2.url("postgres"), "SELECT count(*) FROM kept") == 0
        assert _scalar(pg2.url("postgres"), "SHOW fsync") == "on"
    finally:
        pg2.stop()
        pg2.stop()


def test_tcp_listener_requires_the_generated_password(pg_data_dir: Path) -> None:
    """With a port, 127.0.0.1 accepts the superuser with its password only."""
    port = _free_port()
    with EmbeddedPostgres(pg_data_dir / "pg", port=port, settings=TEST_SETTINGS) as pg:
        url = pg.url("postgres", tcp=True)
        assert f"127.0.0.1:{port}" in url
        assert _scalar(url, "SELECT 1") == 1
        wrong = url.replace(pg.password(), "wrong-password")
        with pytest.raises(Exception, match="password authentication failed"):
            _scalar(wrong, "SELECT 1")


def test_url_before_start_is_an_error(pg_data_dir: Path) -> None:
    """Asking for a URL of a stopped server raises EmbeddedPostgresError."""
    with pytest.raises(EmbeddedPostgresError):
        EmbeddedPostgres(pg_data_dir / "pg").url()


def test_failed_start_raises_with_the_server_log(pg_data_dir: Path) -> None:
    """An invalid server setting fails start() with the log in the message."""
    pg = EmbeddedPostgres(pg_data_dir / "pg", settings={"no_such_setting": "1"})
    with pytest.raises(EmbeddedPostgresError, match="no_such_setting"):
        pg.start()
    assert not pg.running
    pg.stop()


def test_second_instance_attaches_as_a_guest(pg_data_dir: Path) -> None:
    """A second instance on a running cluster shares it and its stop() leaves it up."""
    with EmbeddedPostgres(pg_data_dir / "pg", settings=TEST_SETTINGS) as owner:
        assert owner.owner
        guest = EmbeddedPostgres(pg_data_dir / "pg").start()
        assert not guest.owner
        assert guest.url("postgres") == owner.url("postgres")
        guest.stop()
        assert _scalar(owner.url("postgres"), "SELECT 1") == 1
    assert not (pg_data_dir / "pg" / "postmaster.pid").exists()


def test_orphaned_server_is_adopted_and_stopped(pg_data_dir: Path) -> None:
    """A server left behind by a dead owner (lock released) is adopted, then stopped."""
    lost = EmbeddedPostgres(pg_data_dir / "pg", settings=TEST_SETTINGS).start()
    lost._unlock()  # what the kernel does when the owning process dies
    heir = EmbeddedPostgres(pg_data_dir / "pg").start()
    try:
        assert heir.owner
        assert _scalar(heir.url("postgres"), "SHOW fsync") == "off"  # the same server
    finally:
        heir.stop()
    assert not (pg_data_dir / "pg" / "postmaster.pid").exists()
    assert lost.socket_dir is not None
    assert not lost.socket_dir.exists()


def test_the_server_listens_where_it_did_at_every_start(pg_data_dir: Path) -> None:
    """The socket directory is named after the data directory: a server started again,
    after a stop or after being killed, gives the same URL (other processes that point
    at it reconnect by themselves); a path held by someone else gives way."""
    data_dir = pg_data_dir / "pg"
    with EmbeddedPostgres(data_dir, settings=TEST_SETTINGS) as pg:
        url = pg.url("postgres")
    with EmbeddedPostgres(data_dir, settings=TEST_SETTINGS) as pg:
        assert pg.url("postgres") == url
        socket_dir = pg.socket_dir
        os.kill(int((data_dir / "postmaster.pid").read_text().split()[0]), signal.SIGKILL)
        pg._unlock()  # as when its owner died with it
    assert socket_dir is not None
    again = EmbeddedPostgres(data_dir, settings=TEST_SETTINGS)
    for _ in range(50):  # the killed server's zombie must be reaped first
        reap_dead_children("postgres")  # ours when this process is a reaper (pg_watch tests)
        try:
            again.start()
            break
        except EmbeddedPostgresError:
            time.sleep(0.2)
    else:
        raise AssertionError("the killed server's data directory never started again")
    try:
        assert again.url("postgres") == url
        assert _scalar(url, "SELECT 1") == 1
    finally:
        again.stop()
    socket_dir.mkdir(mode=0o755)  # not private: someone else's, say
    try:
        with EmbeddedPostgres(data_dir, settings=TEST_SETTINGS) as pg:
            assert pg.socket_dir != socket_dir
    finally:
        socket_dir.rmdir()


def test_the_server_gets_none_of_piclouds_secrets(
    pg_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL's processes inherit neither ``PICLOUD_*`` settings (the admin token)
    nor any other variable of picloud's environment but PATH-like ones."""
    monkeypatch.setenv("PICLOUD_ADMIN_TOKEN", "pc_secret-token-of-the-admin")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "cloud-secret")
    monkeypatch.setenv("PGPASSWORD", "libpq-secret")
    with EmbeddedPostgres(pg_data_dir / "pg", settings=TEST_SETTINGS) as pg:
        engine = create_engine(pg.url("postgres"), poolclass=pool.NullPool)
        with engine.connect() as conn:  # the backend lives while the connection does
            backend = conn.execute(text("SELECT pg_backend_pid()")).scalar()
            postmaster = int((pg_data_dir / "pg" / "postmaster.pid").read_text().split()[0])
            environs = [Path(f"/proc/{pid}/environ").read_bytes() for pid in (postmaster, backend)]
        engine.dispose()
        for environ in environs:
            names = {entry.split(b"=", 1)[0].decode() for entry in environ.split(b"\0") if entry}
            assert not any(word in environ for word in (b"pc_secret", b"cloud-secret", b"libpq"))
            assert not {n for n in names if n.startswith("PICLOUD")}, names
