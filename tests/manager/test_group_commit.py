"""GroupCommit: batching, fairness between callers, errors, cancellation."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import attrs
import pytest

from manager_core.group_commit import GroupCommit

pytestmark = pytest.mark.anyio


@attrs.define(eq=False)
class Item:
    name: str
    done: anyio.Event = attrs.Factory(anyio.Event)
    error: BaseException | None = None


class Recorder:
    """A flush that takes until its gate opens, recording batches and returns."""

    def __init__(self, max_batch: int = 100) -> None:
        self.batches: list[list[str]] = []
        self.events: list[str] = []
        self.gates: list[anyio.Event] = []
        self.flush_started = anyio.Event()  # replaced at every flush
        self.group = GroupCommit[Item](self.flush, max_batch)
        self.fail: set[str] = set()

    async def flush(self, batch: list[Item]) -> None:
        names = [i.name for i in batch]
        self.batches.append(names)
        self.events.append(f"flush {','.join(names)}")
        gate = anyio.Event()
        self.gates.append(gate)
        self.flush_started.set()
        self.flush_started = anyio.Event()
        with anyio.move_on_after(2):  # a failing test must not hang on a shielded flush
            await gate.wait()
        for item in batch:
            if item.name in self.fail:
                item.error = RuntimeError(item.name)
            item.done.set()

    async def submit(self, name: str) -> None:
        try:
            await self.group.submit(Item(name))
            self.events.append(f"back {name}")
        except RuntimeError:
            self.events.append(f"failed {name}")

    async def open_next(self, n: int) -> None:
        """Wait for the n-th flush to start, then let it finish."""
        with anyio.fail_after(5):
            while len(self.gates) < n:
                await self.flush_started.wait()
        self.gates[n - 1].set()


async def settle() -> None:
    for _ in range(20):
        await anyio.lowlevel.checkpoint()


async def test_a_lone_item_is_flushed_at_once() -> None:
    r = Recorder()
    async with anyio.create_task_group() as tg:
        tg.start_soon(r.submit, "a")
        await r.open_next(1)
    assert r.batches == [["a"]]
    assert r.events == ["flush a", "back a"]


async def test_items_submitted_during_a_flush_share_the_next_one() -> None:
    r = Recorder()
    async with anyio.create_task_group() as tg:
        tg.start_soon(r.submit, "a")
        await settle()
        for name in "bcd":
            tg.start_soon(r.submit, name)
        await settle()
        await r.open_next(1)
        await r.open_next(2)
    assert r.batches == [["a"], ["b", "c", "d"]]


async def test_a_leader_returns_after_its_own_batch_and_a_waiter_leads_the_rest() -> None:
    """The caller whose batch is done is back before the next batch is flushed: it
    is not kept flushing for those who came later."""
    r = Recorder()
    async with anyio.create_task_group() as tg:
        tg.start_soon(r.submit, "a")
        await settle()
        tg.start_soon(r.submit, "b")
        await settle()
        await r.open_next(1)  # a's batch
        await settle()
        tg.start_soon(r.submit, "c")  # arrives while b leads
        await settle()
        assert r.events == ["flush a", "back a", "flush b"]
        await r.open_next(2)
        await r.open_next(3)
    assert r.batches == [["a"], ["b"], ["c"]]
    assert r.events == ["flush a", "back a", "flush b", "back b", "flush c", "back c"]


async def test_batches_are_capped() -> None:
    r = Recorder(max_batch=2)
    async with anyio.create_task_group() as tg:
        tg.start_soon(r.submit, "a")
        await settle()
        for name in "bcde":
            tg.start_soon(r.submit, name)
        await settle()
        for n in range(1, 4):
            await r.open_next(n)
    assert r.batches == [["a"], ["b", "c"], ["d", "e"]]


async def test_a_failed_item_raises_for_its_caller_only() -> None:
    r = Recorder()
    r.fail = {"b"}
    async with anyio.create_task_group() as tg:
        tg.start_soon(r.submit, "a")
        await settle()
        tg.start_soon(r.submit, "b")
        tg.start_soon(r.submit, "c")
        await settle()
        await r.open_next(1)
        await r.open_next(2)
    assert sorted(e for e in r.events if not e.startswith("flush")) == [
        "back a",
        "back c",
        "failed b",
    ]


async def test_items_of_cancelled_callers_are_still_flushed() -> None:
    """A caller that gave up leaves its item in the group: it is flushed all the same
    (e.g. a claimed row must still reach its runner)."""
    r = Recorder()
    async with anyio.create_task_group() as tg:
        tg.start_soon(r.submit, "a")
        await settle()
        async with anyio.create_task_group() as gone:
            gone.start_soon(r.submit, "b")
            gone.start_soon(r.submit, "c")
            await settle()
            gone.cancel_scope.cancel()
        await r.open_next(1)
        await r.open_next(2)  # a leads on: nobody else waits
    assert r.batches == [["a"], ["b", "c"]]
    assert r.events[-1] == "back a"


async def test_a_caller_cancelled_after_it_was_told_to_lead_still_leads() -> None:
    """The lead passes to b; b's caller is cancelled at that moment: b flushes anyway
    (shielded), so c is not left waiting forever."""
    r = Recorder()
    b_scope = anyio.CancelScope()

    async def submit_b() -> None:
        with b_scope:
            await r.submit("b")

    async with anyio.create_task_group() as tg:
        tg.start_soon(r.submit, "a")
        await settle()
        tg.start_soon(submit_b)
        await settle()
        tg.start_soon(r.submit, "c")
        await settle()
        r.gates[0].set()  # a's batch done: b is promoted ...
        b_scope.cancel()  # ... and cancelled before it runs
        await r.open_next(2)
    assert r.batches == [["a"], ["b", "c"]]
    assert "back c" in r.events
