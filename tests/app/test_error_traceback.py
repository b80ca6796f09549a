"""End to end: a script's uncaught exception leaves its own traceback on its execution
record and its dead letter (``error.traceback``), never a host path, and only for
those who may read its message."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from manager_core.api.executions import WITHHELD
from tests.app.server import Server
from tests.app.test_contract_tour import Admin, assert_route_error, count, new_user, wait_for

# handle (line 8) → outer (line 5) → inner (line 2), which raises.
NESTED = (
    "def inner(n):\n"
    "    raise ValueError('kaboom ' + str(n))\n"
    "\n"
    "def outer(n):\n"
    "    return inner(n + 1)\n"
    "\n"
    "def handle(e, ctx):\n"
    "    return outer(41)\n"
)
HOST_MARKS = ("/work", "site-packages", "executor_core")
FAST_RETRY = {"backoff": "constant", "base_delay_ms": 10, "max_delay_ms": 10, "jitter": 0.0}


@pytest.fixture
def admin(server: Server) -> Iterator[Admin]:
    a = Admin(server)
    yield a
    a.close()


def assert_nested_traceback(error: dict[str, Any]) -> None:
    """``error`` is NESTED's: kind, message, and a traceback naming its three frames,
    innermost last, and nothing of the host."""
    assert (error["kind"], error["message"]) == ("uncaught_exception", "ValueError: kaboom 42")
    tb = error["traceback"]
    assert isinstance(tb, str), error
    frames = [tb.index(f"line {n}, in {name}") for n, name in ((8, "handle"), (5, "outer"))]
    frames.append(tb.index("line 2, in inner"))
    assert frames == sorted(frames), tb
    assert "return outer(41)" in tb
    assert "raise ValueError('kaboom ' + str(n))" in tb
    assert tb.rstrip().endswith("ValueError: kaboom 42"), tb
    for mark in HOST_MARKS:
        assert mark not in tb, (mark, tb)


def test_a_route_scripts_exception_keeps_its_own_traceback(
    admin: Admin, user: httpx.Client
) -> None:
    """A sync route whose script raises from a nested function answers 502; its
    execution record, read alone and in the list, carries the script's traceback: its
    lines and function names, no host path."""
    admin.script("nested", NESTED)
    admin.route("GET", "/nested", "nested")
    answer = assert_route_error(user.get(f"/apps/{admin.app_name}/nested"), 502, "script_error")
    execution = admin.finished(answer["execution_id"])
    assert execution["status"] == "failed"
    assert_nested_traceback(execution["error"])
    (listed,) = admin.executions()
    assert listed["error"] == execution["error"]


def test_an_exhausted_triggers_dead_letter_carries_the_traceback(admin: Admin) -> None:
    """A kv trigger that raises on both of its attempts is dead-lettered; the dead
    letter and its execution record carry the script's traceback."""
    admin.script("nested", NESTED)
    admin.post(
        "/triggers/kv",
        {"script": "nested", "key_glob": "job/*", "retry": {**FAST_RETRY, "max_attempts": 2}},
    )
    admin.ok("PUT", "/kv/job/1", 1, expect=201)
    (letter,) = wait_for(lambda: admin.get("/dead-letters")["items"], 30, "a dead letter")
    assert letter["attempts"] == 2
    assert_nested_traceback(letter["error"])
    execution = admin.finished(letter["execution_id"])
    assert (execution["status"], execution["attempts"]) == ("dead_lettered", 2)
    assert_nested_traceback(execution["error"])


def test_an_app_read_member_sees_no_traceback(
    server: Server, admin: Admin, user: httpx.Client
) -> None:
    """A member with app_read alone reads an execution's and a dead letter's error
    kind, but its message is withheld and its traceback null; with app_read_data the
    traceback shows."""
    admin.script("nested", NESTED)
    admin.route("GET", "/nested", "nested")
    admin.post(
        "/triggers/kv", {"script": "nested", "key_glob": "once/*", "retry": {"max_attempts": 1}}
    )
    assert_route_error(user.get(f"/apps/{admin.app_name}/nested"), 502, "script_error")
    admin.ok("PUT", "/kv/once/1", 1, expect=201)
    wait_for(lambda: admin.get("/dead-letters")["items"], 30, "a dead letter")
    wait_for(
        lambda: count(admin.executions(status="dead_lettered"), 1), 30, "a dead-lettered record"
    )
    hidden = {"kind": "uncaught_exception", "message": WITHHELD, "traceback": None}
    members = {"watcher": ["app_read"], "reader": ["app_read", "app_read_data"]}
    seen: dict[str, list[dict[str, Any]]] = {}
    for name, capabilities in members.items():
        member = new_user(server)
        admin.ok("PUT", f"/members/{member['id']}", {"capabilities": capabilities})
        with server.client(headers={"Authorization": f"Bearer {member['token']}"}) as c:
            executions = c.get(f"{admin.base}/executions").json()["items"]
            letters = c.get(f"{admin.base}/dead-letters").json()["items"]
            one = [c.get(f"{admin.base}/executions/{e['id']}").json() for e in executions]
        assert len(executions) == 2
        assert len(letters) == 1
        seen[name] = [x["error"] for x in [*executions, *one, *letters]]
    assert seen["watcher"] == [hidden] * 5
    for error in seen["reader"]:
        assert_nested_traceback(error)


@pytest.mark.parametrize(
    ("source", "status", "code", "kind"),
    [
        ("def handle(e, ctx):\n    ctx.reject('nope')\n", 422, "rejected", "rejected"),
        ("import time\ndef handle(e, ctx):\n    time.sleep(30)\n", 504, "timeout", "timeout"),
    ],
    ids=["rejected", "timeout"],
)
def test_a_rejected_or_timed_out_route_execution_has_no_traceback(
    admin: Admin, user: httpx.Client, source: str, status: int, code: str, kind: str
) -> None:
    """A rejection or a timeout is not a script's exception: traceback null."""
    admin.script("s", source, timeout_seconds=1)
    admin.route("GET", "/s", "s")
    answer = assert_route_error(user.get(f"/apps/{admin.app_name}/s"), status, code)
    error = admin.finished(answer["execution_id"])["error"]
    assert (error["kind"], error["traceback"]) == (kind, None)


def test_a_timeout_after_an_exception_leaves_no_stale_traceback(admin: Admin) -> None:
    """A trigger that raises on its first attempt and times out on its second is
    dead-lettered with the timeout: its record and dead letter show no traceback (the
    first attempt's is gone)."""
    admin.script(
        "flaky",
        "import time\n"
        "def handle(e, ctx):\n"
        "    if ctx.attempt == 1:\n"
        "        raise ValueError('first')\n"
        "    time.sleep(30)\n",
        timeout_seconds=1,
    )
    admin.post(
        "/triggers/kv",
        {"script": "flaky", "key_glob": "job/*", "retry": {**FAST_RETRY, "max_attempts": 2}},
    )
    admin.ok("PUT", "/kv/job/1", 1, expect=201)
    (letter,) = wait_for(lambda: admin.get("/dead-letters")["items"], 30, "a dead letter")
    execution = admin.finished(letter["execution_id"])
    assert (execution["status"], execution["attempts"]) == ("dead_lettered", 2)
    for error in (letter["error"], execution["error"]):
        assert (error["kind"], error["traceback"]) == ("timeout", None)
