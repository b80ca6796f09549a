"""The real ``picloud serve`` as a subprocess, for end-to-end tests over HTTP."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import attrs
import httpx

ROOT = Path(__file__).resolve().parents[2]
PICLOUD = Path(sys.executable).with_name("picloud")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@attrs.define
class Server:
    base_url: str
    token: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=60, **kwargs)  # type: ignore[arg-type]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(
                f"picloud did not stop within {timeout} s:\n{self.log()}"
            ) from None


def start_server(
    database_url: str,
    log_path: Path,
    *,
    token: str | None = None,
    env: Mapping[str, str] | None = None,
    ready_timeout: float = 90,
) -> Server:
    token = token or "pc_test_" + secrets.token_urlsafe(24)
    port = free_port()
    environ = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PICLOUD_")},
        "PICLOUD_DATABASE_URL": database_url,
        "PICLOUD_ADMIN_TOKEN": token,
        "PICLOUD_PORT": str(port),
        "PICLOUD_HOST": "127.0.0.1",
        "PICLOUD_DISPATCH_POLL_INTERVAL_MS": "50",
        **(env or {}),
    }
    log_file = log_path.open("ab")
    process = subprocess.Popen(
        [str(PICLOUD), "serve"], cwd=ROOT, env=environ, stdout=log_file, stderr=subprocess.STDOUT
    )
    log_file.close()
    server = Server(f"http://127.0.0.1:{port}", token, process, log_path)
    deadline = time.monotonic() + ready_timeout
    while True:
        if process.poll() is not None:
            raise AssertionError(f"picloud serve exited with {process.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.base_url}/readyz", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            server.terminate()
            raise AssertionError(f"picloud serve not ready in {ready_timeout} s:\n{server.log()}")
        time.sleep(0.1)


@contextmanager
def serving(database_url: str, log_path: Path, **kwargs: object) -> Iterator[Server]:
    server = start_server(database_url, log_path, **kwargs)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        code = server.terminate()
        assert code == 0, f"picloud serve exited with {code}:\n{server.log()}"
