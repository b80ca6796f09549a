"""PICLOUD_MAX_QUEUED_EXECUTIONS_PER_APP over ``picloud serve``: an app whose async
requests pile up faster than they run is refused with 503 ``overloaded`` (nothing
written), other apps are not, and it is admitted again once its queue drains."""

from __future__ import annotations

import time
from pathlib import Path

from tests.app.server import Server, serving

SLOW = """
import time
def handle(event, ctx):
    time.sleep(0.5)
"""


def _app(server: Server, name: str) -> str:
    with server.client(headers=server.auth) as c:
        app = c.post("/api/v1/admin/apps", json={"name": name}).json()["id"]
        base = f"/api/v1/admin/apps/{app}"
        assert c.post(f"{base}/scripts", json={"name": "slow", "source": SLOW}).status_code == 201
        r = c.post(
            f"{base}/routes",
            json={"method": "POST", "path": "/q", "script": "slow", "dispatch_mode": "async"},
        )
        assert r.status_code == 201, r.text
    return base


def test_an_app_with_a_full_queue_is_refused_until_it_drains(db_url: str, tmp_path: Path) -> None:
    env = {
        "PICLOUD_MAX_QUEUED_EXECUTIONS_PER_APP": "3",
        "PICLOUD_MAX_CONCURRENT_EXECUTIONS": "1",
    }
    with serving(db_url, tmp_path / "serve.log", env=env) as server:
        base = _app(server, "flooded")
        _app(server, "calm")
        with server.client() as c:
            answers = [c.post("/apps/flooded/q", json={"i": i}) for i in range(6)]
            codes = [a.status_code for a in answers]
            assert codes[:3] == [202, 202, 202], [a.text for a in answers]
            refused = answers[3:]
            assert {a.status_code for a in refused} == {503}, [a.text for a in refused]
            for answer in refused:
                assert answer.json()["error"]["code"] == "overloaded"
                assert answer.headers["retry-after"] == "1"
            assert c.post("/apps/calm/q", json={}).status_code == 202  # its own queue
        with server.client(headers=server.auth) as admin:
            listed = admin.get(f"{base}/executions?limit=100").json()["items"]
            assert len(listed) == 3  # nothing of a refused request was written
            metrics = admin.get("/metrics").text
            assert "picloud_backlog_refusals_total 3.0" in metrics
        with server.client() as c:
            deadline = time.monotonic() + 30
            while (again := c.post("/apps/flooded/q", json={})).status_code != 202:
                assert again.status_code == 503, again.text
                assert time.monotonic() < deadline, "the queue never drained"
                time.sleep(0.2)
