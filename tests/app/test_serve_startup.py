"""How `picloud serve` (and `picloud migrate`) fail to start: one line on stderr and a
documented exit status, before anything is started; one `serve` per data directory;
a signal while it starts stops what was started."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.app.server import PICLOUD, ROOT, free_port
from tests.app.test_serve_embedded import start, stop, wait_ready

PASSWORD = "sekrit-pass-4711"


def _run(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PICLOUD_")}
    return subprocess.run(
        [str(PICLOUD), *args],
        env={**clean, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _one_line(result: subprocess.CompletedProcess[str], code: int, prefix: str) -> str:
    """The single stderr line of a failed command, checked."""
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(prefix), result.stderr
    return lines[0]


@pytest.mark.parametrize("port", ["70000", "-1", "http"])
def test_a_port_out_of_range_is_refused_before_anything_starts(port: str, tmp_path: Path) -> None:
    """``--port`` is checked as PICLOUD_PORT is (0-65535): exit 2, nothing created."""
    data_dir = tmp_path / "data"
    result = _run("serve", f"--port={port}", "--data-dir", str(data_dir))
    assert result.returncode == 2
    assert "argument --port: must be a TCP port (0-65535" in result.stderr
    assert not data_dir.exists()


@pytest.mark.parametrize("command", ["serve", "migrate"])
def test_a_data_dir_that_cannot_be_a_directory_is_one_line(command: str, tmp_path: Path) -> None:
    """A data directory that is a file (or below one): exit 1, one line, no traceback."""
    afile = tmp_path / "afile"
    afile.write_text("")
    for data_dir in (afile, afile / "below") if command == "serve" else (afile,):
        line = _one_line(_run(command, "--data-dir", str(data_dir)), 1, f"picloud {command}: ")
        assert f"cannot use the data directory {data_dir}: " in line


def test_serve_names_the_picloud_variables_it_does_not_know(tmp_path: Path) -> None:
    """A typo'd setting is named (not its value) on stderr before anything else."""
    afile = tmp_path / "afile"
    afile.write_text("")
    result = _run("serve", "--data-dir", str(afile), PICLOUD_MAX_WORKERS="sekrit-47")
    first, *_ = result.stderr.splitlines()
    assert "PICLOUD_MAX_WORKERS" in first
    assert "sekrit-47" not in result.stderr


@pytest.mark.parametrize("command", ["serve", "migrate"])
def test_a_bad_or_unreachable_database_url_is_one_line_without_the_password(
    command: str,
) -> None:
    """A URL whose port is no number: exit 2; a server that does not answer: exit 1,
    "cannot reach the database at HOST:PORT: why". Neither shows the password."""
    bad = _run(command, PICLOUD_DATABASE_URL=f"postgresql://u:{PASSWORD}@127.0.0.1:nope/db")
    line = _one_line(bad, 2, "picloud: PICLOUD_DATABASE_URL=")
    assert line.endswith(": its port must be a number (0-65535)")
    port = free_port()
    away = _run(command, PICLOUD_DATABASE_URL=f"postgresql://u:{PASSWORD}@127.0.0.1:{port}/db")
    line = _one_line(away, 1, f"picloud {command}: cannot reach the database at 127.0.0.1:{port}: ")
    assert "refused" in line
    assert PASSWORD not in bad.stderr + away.stderr


def test_an_address_it_cannot_listen_on_is_one_line_before_anything_starts(
    tmp_path: Path,
) -> None:
    """A port in use or a host that does not resolve: exit 1, "cannot listen on
    HOST:PORT: why", and no embedded PostgreSQL was started for it."""
    data_dir = tmp_path / "data"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        in_use = _run("serve", "--port", str(port), "--data-dir", str(data_dir))
    line = _one_line(in_use, 1, f"picloud serve: cannot listen on 127.0.0.1:{port}: ")
    assert "in use" in line
    bad_host = _run("serve", "--host", "no-such-host.invalid", "--data-dir", str(data_dir))
    _one_line(bad_host, 1, "picloud serve: cannot listen on no-such-host.invalid:8080: ")
    assert not (data_dir / "pg").exists()


def test_a_second_serve_on_a_data_dir_in_use_fails_at_once(pg_data_dir: Path) -> None:
    """While a `serve` runs on a data directory, a second one (another port, or the
    same) exits 1 naming the first one's pid, having started nothing; `picloud
    migrate` still works beside it. A serve killed outright leaves no lock: the next
    start adopts the PostgreSQL it left and stops it on SIGTERM."""
    log = pg_data_dir / "serve.log"
    port = free_port()
    first = start(pg_data_dir, port, log)
    try:
        wait_ready(first, port, log)
        for other_port in (free_port(), port):
            second = _run("serve", "--port", str(other_port), "--data-dir", str(pg_data_dir))
            line = _one_line(second, 1, "picloud serve: the data directory ")
            assert f"{pg_data_dir} is in use by another picloud serve (pid {first.pid})" in line
            assert "PICLOUD_DATABASE_URL" in line
        migrated = _run("migrate", "--data-dir", str(pg_data_dir), timeout=120)
        assert migrated.returncode == 0, migrated.stderr
    finally:
        first.kill()
        first.wait(30)
    assert (pg_data_dir / "pg" / "postmaster.pid").exists()  # left running by the kill
    port = free_port()
    again = start(pg_data_dir, port, log)
    try:
        wait_ready(again, port, log)
    finally:
        code = stop(again)
    assert code == 0, log.read_text()
    assert not (pg_data_dir / "pg" / "postmaster.pid").exists(), "embedded PostgreSQL left running"


def test_sigterm_while_it_starts_stops_postgres_and_exits_0(pg_data_dir: Path) -> None:
    """SIGTERM once the embedded PostgreSQL is up but before the server serves (while
    it migrates): exit 0, PostgreSQL stopped and its socket directory removed."""
    log = pg_data_dir / "serve.log"
    proc = start(pg_data_dir, free_port(), log)
    pid_file = pg_data_dir / "pg" / "postmaster.pid"
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        lines = pid_file.read_text().splitlines() if pid_file.exists() else []
        if len(lines) >= 8 and lines[7].strip() == "ready":
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, log.read_text()
    assert "listening on" not in log.read_text()  # it was still starting
    assert not pid_file.exists(), "embedded PostgreSQL left running"
    digest = hashlib.sha256(str(pg_data_dir / "pg").encode()).hexdigest()[:16]
    assert not Path(lines[4].split(",")[0]).exists()
    assert not Path("/tmp", f"picloud-pg-{digest}").exists()


def _catches_sigterm(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


PROBE = """
import signal, sys
from picloud import cli
def probe(args):
    print(signal.getsignal(signal.SIGTERM).__qualname__, "sqlalchemy" in sys.modules)
    return 0
cli._main = probe
sys.exit(cli.main(["serve", "--data-dir", "/dev/null/picloud-probe"]))
"""


def test_serve_catches_sigterm_before_the_imports_of_a_start() -> None:
    """``main`` installs the start's signal handler before it reads settings, and
    before SQLAlchemy and the packages are imported (a second or more under load): a
    SIGTERM then is a clean stop, not death by the signal (143)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PICLOUD_")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert out.stdout.split() == ["StartupSignals._on_signal", "False"]


def test_sigterm_as_soon_as_it_is_caught_exits_0(tmp_path: Path) -> None:
    """From the moment ``picloud serve`` has read its arguments (before the imports of
    a start), SIGTERM ends it with status 0 and the line saying so, not 143."""
    data_dir = tmp_path / "data"
    log = tmp_path / "serve.log"
    proc = start(data_dir, free_port(), log)
    deadline = time.monotonic() + 30
    while not _catches_sigterm(proc.pid):
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert stop(proc) == 0, log.read_text()
    assert "picloud serve: stopped before it served" in log.read_text()
    assert not (data_dir / "pg" / "postmaster.pid").exists()
