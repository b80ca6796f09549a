"""`picloud serve` as a person runs it: no database URL, an embedded PostgreSQL."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

from tests.app.server import PICLOUD, ROOT, free_port, serving


def start(data_dir: Path, port: int, log: Path, *, flags: bool = False) -> subprocess.Popen[bytes]:
    """``picloud serve`` told where to live by ``PICLOUD_*`` settings, or (``flags``)
    by its command-line options alone."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PICLOUD_")}
    argv = [str(PICLOUD), "serve"]
    if flags:
        argv += ["--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data_dir)]
    else:
        env |= {"PICLOUD_DATA_DIR": str(data_dir), "PICLOUD_PORT": str(port)}
    with log.open("ab") as out:
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=out)


def wait_ready(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("not ready:\n" + log.read_text())


def stop(proc: subprocess.Popen[bytes], how: signal.Signals = signal.SIGTERM) -> int:
    proc.send_signal(how)
    return proc.wait(60)


def test_serve_embedded_first_start_prints_a_token_and_second_start_reuses_the_data(
    pg_data_dir: Path,
) -> None:
    """First start: embedded PostgreSQL, migration, a generated admin token printed once.
    SIGTERM: exit 0 and PostgreSQL stopped. Second start, placed by ``--host``,
    ``--port`` and ``--data-dir`` instead of settings: same data, no new admin; SIGINT
    stops it as SIGTERM does."""
    log = pg_data_dir / "serve.log"
    port = free_port()
    proc = start(pg_data_dir, port, log)
    try:
        wait_ready(proc, port, log)
        match = re.search(r"its token \(shown once\):\n(\S+)", log.read_text())
        assert match, log.read_text()
        token = match.group(1)
        auth = {"Authorization": f"Bearer {token}"}
        created = httpx.post(
            f"http://127.0.0.1:{port}/api/v1/admin/apps",
            headers=auth,
            json={"name": "kept"},
            timeout=30,
        )
        assert created.status_code == 201, created.text
    finally:
        code = stop(proc)
    assert code == 0, log.read_text()
    assert not (pg_data_dir / "pg" / "postmaster.pid").exists(), "embedded PostgreSQL left running"

    first_log = log.read_text()
    port = free_port()
    proc = start(pg_data_dir, port, log, flags=True)
    try:
        wait_ready(proc, port, log)
        apps = httpx.get(f"http://127.0.0.1:{port}/api/v1/admin/apps", headers=auth, timeout=30)
        assert [a["name"] for a in apps.json()["items"]] == ["kept"]
    finally:
        code = stop(proc, signal.SIGINT)
    assert code == 0, log.read_text()
    assert not (pg_data_dir / "pg" / "postmaster.pid").exists(), "embedded PostgreSQL left running"
    assert log.read_text()[len(first_log) :].count("shown once") == 0


def test_admin_create_user_prints_a_working_token(pg_data_dir: Path) -> None:
    """`picloud admin create-user NAME`, on a data directory `picloud migrate` made,
    prints a token that authenticates at the `serve` started there."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PICLOUD_")}
    env["PICLOUD_DATA_DIR"] = str(pg_data_dir)
    migrated = subprocess.run(
        [str(PICLOUD), "migrate"], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert migrated.returncode == 0, migrated.stderr
    made = subprocess.run(
        [str(PICLOUD), "admin", "create-user", "ann"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    again = subprocess.run(
        [str(PICLOUD), "admin", "create-user", "ann"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert again.returncode == 1
    assert "taken" in again.stderr
    log = pg_data_dir / "serve.log"
    port = free_port()
    proc = start(pg_data_dir, port, log)
    try:
        wait_ready(proc, port, log)
        r = httpx.post(
            f"http://127.0.0.1:{port}/api/v1/admin/apps",
            headers={"Authorization": f"Bearer {token}"},
            json={"name": "anns"},
            timeout=30,
        )
        assert r.status_code == 201, r.text
        forbidden = httpx.post(
            f"http://127.0.0.1:{port}/api/v1/admin/users",
            headers={"Authorization": f"Bearer {token}"},
            json={"name": "x"},
            timeout=30,
        )
        assert forbidden.status_code == 403
    finally:
        assert stop(proc) == 0


def test_idle_connections_past_the_limit_make_room(db_url: str, tmp_path: Path) -> None:
    """PICLOUD_MAX_CONNECTIONS bounds the open connections, but idle clients holding
    every socket cannot lock others out: a request on a connection past the limit is
    served, and the connection idle the longest is closed for it, each time."""
    with serving(db_url, tmp_path / "serve.log", env={"PICLOUD_MAX_CONNECTIONS": "3"}) as server:
        host, port = server.base_url.removeprefix("http://").split(":")
        idle = []
        try:
            for _ in range(3):
                idle.append(socket.create_connection((host, int(port))))
                time.sleep(0.1)
            for oldest in idle[:2]:
                assert httpx.get(f"{server.base_url}/healthz").status_code == 200
                oldest.settimeout(5)
                assert oldest.recv(1) == b""  # closed by the server to make room
                idle.append(socket.create_connection((host, int(port))))
                time.sleep(0.1)
        finally:
            for s in idle:
                s.close()
