"""A node killed with SIGKILL mid-execution, over the real binary: the execution it
was running comes back when its lease (PICLOUD_LEASE_SECONDS) runs out, runs again
on another node, and its effect is applied exactly once."""

from __future__ import annotations

import time
from pathlib import Path

from tests.app.server import start_server

SLOW_COUNTER = """
import time
def handle(event, ctx):
    time.sleep(1.5)
    ctx.kv.set("n", (ctx.kv.get("n") or 0) + 1)
"""
LEASE = 3


def test_a_killed_nodes_execution_runs_again_once_its_lease_runs_out(
    db_url: str, tmp_path: Path
) -> None:
    env = {"PICLOUD_LEASE_SECONDS": str(LEASE)}
    first = start_server(db_url, tmp_path / "first.log", env=env)
    try:
        with first.client(headers=first.auth) as c:
            app = c.post("/api/v1/admin/apps", json={"name": "crashy"}).json()["id"]
            base = f"/api/v1/admin/apps/{app}"
            r = c.post(f"{base}/scripts", json={"name": "count", "source": SLOW_COUNTER})
            assert r.status_code == 201, r.text
            r = c.post(
                f"{base}/routes",
                json={"method": "POST", "path": "/c", "script": "count", "dispatch_mode": "async"},
            )
            assert r.status_code == 201, r.text
            accepted = c.post("/apps/crashy/c", json={})
            assert accepted.status_code == 202, accepted.text
            execution = f"{base}/executions/{accepted.json()['execution_id']}"
            deadline = time.monotonic() + 10
            while c.get(execution).json()["status"] != "running":
                assert time.monotonic() < deadline
                time.sleep(0.05)
        time.sleep(0.3)  # in the script's sleep
        first.process.kill()
        first.process.wait()
        killed = time.monotonic()
    finally:
        if first.process.poll() is None:
            first.terminate()
    second = start_server(db_url, tmp_path / "second.log", token=first.token, env=env)
    try:
        with second.client(headers=second.auth) as c:
            deadline = time.monotonic() + 60
            while (record := c.get(execution).json())["status"] != "succeeded":
                assert record["status"] in ("running", "retrying", "queued"), record
                assert time.monotonic() < deadline, record
                time.sleep(0.1)
            took = time.monotonic() - killed
            assert record["attempts"] == 2, record
            assert c.get(f"{base}/kv/n").json()["value"] == 1  # the cut run kept nothing
        # Back after the lease, not the 60 s default (plus the restart, the recovery
        # pass and the 1.5 s run).
        assert took < LEASE + 20, took
    finally:
        assert second.terminate() == 0, second.log()
