"""ExecutionGate: bounded, try-acquire, acquire-with-timeout."""

from __future__ import annotations

import anyio
import pytest

from picloud_shared.gate import ExecutionGate, Permit

pytestmark = pytest.mark.anyio


async def test_try_acquire_refuses_when_full_and_counts_saturation() -> None:
    """The (capacity+1)-th try_acquire gets None and is counted."""
    gate = ExecutionGate(2)
    a, b = gate.try_acquire(), gate.try_acquire()
    assert a
    assert b
    assert gate.free == 0
    assert gate.try_acquire() is None
    assert gate.saturation_count == 1
    a.release()
    a.release()  # idempotent
    assert gate.free == 1


async def test_acquire_with_timeout_gives_up() -> None:
    """acquire(timeout) returns None when nothing frees up in time."""
    gate = ExecutionGate(1)
    held = gate.try_acquire()
    assert held is not None
    assert await gate.acquire(timeout=0.05) is None


async def test_acquire_waits_for_a_release_from_another_task() -> None:
    """A permit released in another task admits the waiter."""
    gate = ExecutionGate(1)
    held = gate.try_acquire()
    assert held is not None

    async def release_soon() -> None:
        await anyio.sleep(0.02)
        held.release()

    async with anyio.create_task_group() as tg:
        tg.start_soon(release_soon)
        permit = await gate.acquire(timeout=5)
    assert permit is not None
    with permit:
        assert gate.in_use == 1
    assert gate.free == 1


def test_capacity_must_be_positive() -> None:
    """A gate of zero slots is a configuration error."""
    with pytest.raises(ValueError, match="at least 1"):
        ExecutionGate(0)


async def test_wait_free_takes_nothing_and_counts_nothing() -> None:
    """wait_free reports a free slot without holding it or counting saturation."""
    gate = ExecutionGate(1)
    assert await gate.wait_free(0.01) is True
    assert gate.free == 1
    held = gate.try_acquire()
    assert held is not None
    assert await gate.wait_free(0.02) is False
    assert gate.saturation_count == 0
    held.release()


async def test_admit_waits_in_line_and_counts_one_saturation() -> None:
    """admit: a permit at once when free; else the first slot freed within the wait,
    which nobody merely trying can take first; else None, counted once."""
    gate = ExecutionGate(1)
    first = await gate.admit(0)
    assert first is not None
    assert await gate.admit(0.01) is None
    assert gate.saturation_count == 1
    got: list[object] = []

    async def waiter() -> None:
        got.append(await gate.admit(5))

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await anyio.sleep(0.01)
        first.release()
        assert gate.try_acquire() is None  # handed to the waiter, not up for grabs
    (second,) = got
    assert isinstance(second, Permit)
    assert gate.free == 0
    second.release()
    assert gate.free == 1


async def test_one_owner_holds_at_most_its_share_and_others_still_get_in() -> None:
    """admit with an owner: past ``owner_share`` the owner's admissions wait (then are
    refused, counted as saturation) while another owner is admitted at once; a slot
    the owner releases goes to its own waiter."""
    gate = ExecutionGate(4, owner_share=2)
    held = [await gate.admit(0, owner="bob") for _ in range(2)]
    assert all(isinstance(p, Permit) for p in held)
    assert await gate.admit(0.01, owner="bob") is None
    assert gate.saturation_count == 1
    assert gate.held_by("bob") == 2
    alice = await gate.admit(0, owner="alice")
    assert alice is not None
    got: list[object] = []

    async def bob_waits() -> None:
        got.append(await gate.admit(5, owner="bob"))

    async with anyio.create_task_group() as tg:
        tg.start_soon(bob_waits)
        await anyio.sleep(0.01)
        assert got == []
        assert await gate.admit(0, owner="carol") is not None  # bob's waiter is not in line
        held[0].release()
    (third,) = got
    assert isinstance(third, Permit)
    assert gate.held_by("bob") == 2
    for p in (held[1], third, alice):
        p.release()
    assert gate.held_by("bob") == gate.held_by("alice") == 0


def test_the_owner_share_defaults_to_all_but_one_slot() -> None:
    """Default share: capacity - 1 (at least 1); never more than the capacity."""
    assert ExecutionGate(16).owner_share == 15
    assert ExecutionGate(1).owner_share == 1
    assert ExecutionGate(4, owner_share=9).owner_share == 4
    assert ExecutionGate(4, owner_share=0).owner_share == 1


async def test_a_refused_or_cancelled_admission_keeps_no_share() -> None:
    """An owner's admission that finds the gate full, or is cancelled while it waits,
    gives its place in the share back."""
    gate = ExecutionGate(1, owner_share=1)
    other = await gate.admit(0, owner="x")
    assert other is not None
    assert await gate.admit(0.01, owner="bob") is None
    assert gate.held_by("bob") == 0
    with anyio.move_on_after(0.01):
        await gate.admit(5, owner="bob")
    assert gate.held_by("bob") == 0
    other.release()
    assert gate.free == 1
