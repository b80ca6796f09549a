"""A sync request answered 504 keeps nothing: its execution commits only while its
caller still waits (``InboxRegistry.hold``), however long it queued for a worker."""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path

import httpx

from tests.app.server import Server, serving

SLOW_WRITER = """
import time
def handle(event, ctx):
    time.sleep(0.8)
    ctx.kv.set("ran:" + ctx.execution_id, 1)
    return "ok"
"""


def _setup(server: Server, name: str) -> str:
    with server.client(headers=server.auth) as c:
        app = c.post("/api/v1/admin/apps", json={"name": name}).json()["id"]
        base = f"/api/v1/admin/apps/{app}"
        r = c.post(
            f"{base}/scripts", json={"name": "slow", "source": SLOW_WRITER, "timeout_seconds": 1}
        )
        assert r.status_code == 201, r.text
        r = c.post(f"{base}/routes", json={"method": "POST", "path": "/s", "script": "slow"})
        assert r.status_code == 201, r.text
    return base


def test_a_request_answered_504_while_it_queued_keeps_nothing(db_url: str, tmp_path: Path) -> None:
    """One worker, six requests (of six apps: one app's sync requests hold at most its
    share of the gate, here one slot) of a 0.8 s script with a 1 s timeout at once:
    each caller waits 3 s (timeout + 2 s), so the later ones run out of wait while they
    queue for the worker. Every 200 has its write and a succeeded record; every 504
    has neither (its record failed, with kind timeout) — before, those ran and
    committed after their caller had been told they timed out."""
    env = {"PICLOUD_EXECUTOR_MAX_WORKERS": "1", "PICLOUD_MAX_CONCURRENT_EXECUTIONS": "8"}
    with serving(db_url, tmp_path / "serve.log", env=env) as server:
        names = [f"queued-{i}" for i in range(6)]
        bases = {name: _setup(server, name) for name in names}

        def call(name: str) -> tuple[str, httpx.Response]:
            with server.client() as c:
                return name, c.post(f"/apps/{name}/s")

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(call, names))
        codes = sorted(a.status_code for _, a in answers)
        assert 200 in codes, [a.text for _, a in answers]
        assert 504 in codes, [a.text for _, a in answers]
        assert set(codes) <= {200, 504}, [a.text for _, a in answers]
        with server.client(headers=server.auth) as c:
            for name, answer in answers:
                base = bases[name]
                for _ in range(100):  # a queued one still finishes after its 504
                    (record,) = c.get(f"{base}/executions").json()["items"]
                    if record["status"] in ("succeeded", "failed"):
                        break
                    time.sleep(0.1)
                ran = c.get(f"{base}/kv?prefix=ran:").json()["items"]
                if answer.status_code == 200:
                    assert record["status"] == "succeeded", record
                    assert len(ran) == 1
                    continue
                body = answer.json()["error"]
                assert body["code"] == "timeout"
                assert "nothing of the request was kept" in body["message"]
                assert record["id"] == body["execution_id"]
                assert record["status"] == "failed", record
                assert record["error"]["kind"] == "timeout", record
                assert ran == []


SLOW_NOOP = """
import time
def handle(event, ctx):
    time.sleep(1.5)
    return "ok"
"""


def test_a_sync_request_whose_app_is_deleted_while_it_runs_is_answered_at_once(
    db_url: str, tmp_path: Path
) -> None:
    """Deleting the app deletes the running request's outbox row: the dispatcher loses
    the row and no node can answer the caller any more. It is answered when the script
    ends (500 internal). Before, its receiver, held for a commit that then found no
    row, kept it waiting past its timeout for HELD_ANSWER_WAIT_SECONDS (60 s) more."""
    with serving(db_url, tmp_path / "serve.log") as server:
        with server.client(headers=server.auth) as c:
            app = c.post("/api/v1/admin/apps", json={"name": "doomed"}).json()["id"]
            base = f"/api/v1/admin/apps/{app}"
            r = c.post(
                f"{base}/scripts",
                json={"name": "slow", "source": SLOW_NOOP, "timeout_seconds": 8},
            )
            assert r.status_code == 201, r.text
            r = c.post(f"{base}/routes", json={"method": "GET", "path": "/s", "script": "slow"})
            assert r.status_code == 201, r.text

        def call() -> tuple[httpx.Response, float]:
            with server.client() as c:
                began = time.monotonic()
                return c.get("/apps/doomed/s"), time.monotonic() - began

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            calling = pool.submit(call)
            time.sleep(0.5)  # the script is sleeping
            with server.client(headers=server.auth) as c:
                assert c.delete(base).status_code == 204
            answer, took = calling.result()
        assert answer.status_code == 500, answer.text
        error = answer.json()["error"]
        assert error["code"] == "internal"
        assert error["execution_id"]  # the rest is for the app's owners, deleted with it
        assert took < 8, took  # the script's 1.5 s, not its 8 s timeout + 2 s
