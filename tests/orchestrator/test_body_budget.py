"""The node's body budget on its own: shares, waits, order and cancellation."""

from __future__ import annotations

import anyio
import pytest

from orchestrator_core.body_budget import BodyBudget, BodyShare

pytestmark = pytest.mark.anyio


async def test_shares_fill_the_capacity_exactly_and_one_byte_more_is_refused() -> None:
    """Shares up to the capacity are granted at once; one byte past it is refused
    after the wait, counted once, and holds nothing."""
    budget = BodyBudget(100)
    a, b, c = budget.share(), budget.share(), budget.share()
    assert await a.cover(60, 0)
    assert await b.cover(40, 0)
    assert budget.in_use == 100
    with anyio.fail_after(5):
        assert not await c.cover(1, 0.05)
    assert (c.held, budget.in_use, budget.refusals) == (0, 100, 1)
    a.release()
    b.release()
    assert budget.in_use == 0


async def test_a_share_grows_by_what_it_lacks_and_is_released_once() -> None:
    budget = BodyBudget(100)
    share = budget.share()
    assert await share.cover(30, 0)
    assert await share.cover(20, 0)  # already covered: nothing more taken
    assert await share.cover(100, 0)
    assert (share.held, budget.in_use) == (100, 100)
    share.release()
    share.release()
    assert budget.in_use == 0


async def test_a_share_larger_than_the_whole_budget_is_refused_at_once() -> None:
    budget = BodyBudget(100)
    with anyio.fail_after(0.5):  # not after its 10 s wait
        assert not await budget.share().cover(101, 10)
    assert budget.in_use == 0


async def test_bytes_freed_within_the_wait_go_to_the_waiter() -> None:
    budget = BodyBudget(100)
    holder = budget.share()
    assert await holder.cover(100, 0)
    waiter = budget.share()

    async def free_soon() -> None:
        await anyio.sleep(0.05)
        holder.release()

    async with anyio.create_task_group() as tg:
        tg.start_soon(free_soon)
        with anyio.fail_after(5):
            assert await waiter.cover(50, 5)
    assert (waiter.held, budget.in_use) == (50, 50)


async def test_waiters_are_served_in_arrival_order() -> None:
    """Bytes freed go to the first waiter: a small share that would fit does not
    overtake a large one waiting before it."""
    budget = BodyBudget(100)
    first, second = budget.share(), budget.share()
    assert await first.cover(60, 0)
    assert await second.cover(40, 0)
    big, small = budget.share(), budget.share()
    got: list[str] = []

    async def wait_for(name: str, share: BodyShare, size: int) -> None:
        if await share.cover(size, 5):
            got.append(name)

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait_for, "big", big, 100)
        await anyio.sleep(0.01)
        tg.start_soon(wait_for, "small", small, 10)
        await anyio.sleep(0.01)
        second.release()  # 40 free: enough for small, not for big, which came first
        await anyio.sleep(0.05)
        assert got == []
        first.release()
        await anyio.sleep(0.05)
        assert got == ["big"]
        big.release()
    assert got == ["big", "small"]
    small.release()
    assert budget.in_use == 0


@pytest.mark.parametrize("gives_up", ["times out", "is cancelled"])
async def test_a_waiter_that_gives_up_lets_the_next_one_in(gives_up: str) -> None:
    """A waiter that times out or is cancelled leaves the queue holding nothing, and
    the one behind it gets what fits at once."""
    budget = BodyBudget(100)
    holder = budget.share()
    assert await holder.cover(95, 0)
    big, small = budget.share(), budget.share()
    got: list[bool] = []

    async def big_waits(scope: anyio.CancelScope) -> None:
        with scope:
            got.append(await big.cover(100, 0.1 if gives_up == "times out" else 10))

    async def small_waits() -> None:
        got.append(await small.cover(5, 10))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            big_scope = anyio.CancelScope()
            tg.start_soon(big_waits, big_scope)
            await anyio.sleep(0.01)
            tg.start_soon(small_waits)
            await anyio.sleep(0.05)
            assert got == []  # 5 bytes are free, but big came first
            if gives_up == "is cancelled":
                big_scope.cancel()
    assert got == ([False, True] if gives_up == "times out" else [True])
    assert (big.held, small.held, budget.in_use) == (0, 5, 100)
