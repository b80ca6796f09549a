"""A sync request's execution commits only while its caller waits: the dispatcher
holds the receiver just before committing (``InboxRegistry.hold``). A held caller
waits for the answer past the end of its wait; one whose wait ended first is told
504, and the hold then fails (the dispatcher rolls the execution back)."""

from __future__ import annotations

import uuid

import anyio
import httpx
import pytest
from starlette.applications import Starlette

from orchestrator_core.inbox import InboxRegistry
from orchestrator_core.routes import UserRouteOrchestrator
from picloud_shared.execution import ScriptResponse
from picloud_shared.gate import ExecutionGate, Permit
from picloud_shared.ids import ExecutionId
from picloud_shared.inbox import InboxResult
from picloud_shared.outbox import NewOutboxRow
from tests.orchestrator.test_user_routes import FakeRoutes, target

pytestmark = pytest.mark.anyio
WAIT_BUFFER = 0.2  # the caller waits the route's 1 s timeout plus this


class CommittingOutbox:
    """Runs each sync row like the dispatcher: ``run_for`` seconds of script, then a
    hold (a commit only if it succeeds), then the answer."""

    def __init__(self, inbox: InboxRegistry, tg: anyio.abc.TaskGroup, run_for: float) -> None:
        self.inbox, self.tg, self.run_for = inbox, tg, run_for
        self.held: list[bool] = []

    async def enqueue(self, row: NewOutboxRow, *, permit: Permit | None = None) -> None:
        self.tg.start_soon(self._run, row, permit)

    async def _run(self, row: NewOutboxRow, permit: Permit | None) -> None:
        assert row.reply_to is not None
        await anyio.sleep(self.run_for)
        if permit is not None:
            permit.release()
        held = self.inbox.hold(row.reply_to)
        self.held.append(held)
        if held:
            await anyio.sleep(0.3)  # the commit, past the end of the caller's wait
            answer = InboxResult(row.execution_id, response=ScriptResponse.json({"ok": True}))
            await self.inbox.deliver(row.reply_to, answer)


async def call(run_for: float) -> tuple[httpx.Response, CommittingOutbox, InboxRegistry]:
    inbox = InboxRegistry()
    async with anyio.create_task_group() as tg:
        outbox = CommittingOutbox(inbox, tg, run_for)
        orch = UserRouteOrchestrator(
            FakeRoutes([target("POST", "/pay", timeout=1)]),
            outbox,
            inbox,
            ExecutionGate(2),
            node_id="n1",
            wait_buffer_seconds=WAIT_BUFFER,
        )
        transport = httpx.ASGITransport(app=Starlette(routes=orch.routes()))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            response = await client.post("/apps/shop/pay")
    return response, outbox, inbox


async def test_a_caller_held_as_its_wait_ends_gets_the_answer() -> None:
    """Held just before its wait ended (the commit takes a while): the answer, not 504."""
    response, outbox, inbox = await call(run_for=1.0)
    assert outbox.held == [True]
    assert response.status_code == 200, response.text
    assert response.json() == {"ok": True}
    assert len(inbox) == 0


async def test_a_caller_whose_wait_ended_first_cannot_be_held() -> None:
    """The wait ended before the execution could commit: 504 saying nothing was kept,
    and the dispatcher's hold fails (so it rolls back)."""
    response, outbox, inbox = await call(run_for=1.0 + WAIT_BUFFER + 0.3)
    assert response.status_code == 504, response.text
    error = response.json()["error"]
    assert error["code"] == "timeout"
    assert "nothing of the request was kept" in error["message"]
    assert outbox.held == [False]
    assert len(inbox) == 0


async def test_waiting_and_hold_follow_the_receiver() -> None:
    """waiting()/hold() are true while the receiver is registered, false after it is
    closed (wait ended, client gone) or answered."""
    registry = InboxRegistry()
    inbox_id, receiver = registry.register()
    with receiver:
        assert registry.waiting(inbox_id)
        assert not receiver.held
        assert registry.hold(inbox_id)
        assert receiver.held
        assert registry.hold(inbox_id)  # a conflict re-run holds again
    assert not registry.waiting(inbox_id)
    assert not registry.hold(inbox_id)
    answered, receiver = registry.register()
    with receiver:
        answer = InboxResult(ExecutionId(uuid.uuid4()), response=ScriptResponse.text("x"))
        await registry.deliver(answered, answer)
        assert not registry.waiting(answered)
        assert not registry.hold(answered)
