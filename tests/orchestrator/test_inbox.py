"""InboxRegistry: the seed's four tests and their neighbours."""

from __future__ import annotations

import uuid

import anyio
import pytest

from orchestrator_core.inbox import InboxRegistry
from picloud_shared.execution import ScriptResponse
from picloud_shared.ids import ExecutionId, InboxId
from picloud_shared.inbox import DeliveryStatus, InboxResult
from picloud_shared.ports import InboxResolver

pytestmark = pytest.mark.anyio


def result() -> InboxResult:
    return InboxResult(ExecutionId(uuid.uuid4()), response=ScriptResponse.text("hi"))


def test_registry_is_an_inbox_resolver() -> None:
    """The registry satisfies the InboxResolver port."""
    assert isinstance(InboxRegistry(), InboxResolver)


async def test_register_deliver_round_trip() -> None:
    """A delivered result reaches its receiver."""
    registry = InboxRegistry()
    inbox_id, receiver = registry.register()
    sent = result()
    with receiver:
        assert await registry.deliver(inbox_id, sent) is DeliveryStatus.DELIVERED
        assert await receiver.receive(timeout=1) == sent
    assert len(registry) == 0


async def test_unknown_id_is_abandoned() -> None:
    """Delivering to an id nobody registered is abandoned."""
    registry = InboxRegistry()
    assert await registry.deliver(InboxId(uuid.uuid4()), result()) is DeliveryStatus.ABANDONED


async def test_dropped_receiver_is_abandoned() -> None:
    """Once the receiver is closed, delivery is abandoned."""
    registry = InboxRegistry()
    inbox_id, receiver = registry.register()
    receiver.close()
    assert await registry.deliver(inbox_id, result()) is DeliveryStatus.ABANDONED


async def test_explicit_cancel() -> None:
    """cancel() forgets the registration; a later delivery is abandoned."""
    registry = InboxRegistry()
    inbox_id, receiver = registry.register()
    with receiver:
        assert registry.cancel(inbox_id) is True
        assert registry.cancel(inbox_id) is False
        assert await registry.deliver(inbox_id, result()) is DeliveryStatus.ABANDONED
        assert await receiver.receive(timeout=0.01) is None


async def test_receive_times_out_and_a_late_answer_is_abandoned() -> None:
    """A wait that expires drops the receiver, so the late answer is abandoned."""
    registry = InboxRegistry()
    inbox_id, receiver = registry.register()
    with receiver:
        assert await receiver.receive(timeout=0.01) is None
    assert await registry.deliver(inbox_id, result()) is DeliveryStatus.ABANDONED


async def test_an_answer_after_a_timed_out_wait_reaches_the_next_wait() -> None:
    """A caller may wait in steps: an answer arriving between (or exactly as) one
    wait times out is kept for the next."""
    registry = InboxRegistry()
    inbox_id, receiver = registry.register()
    sent = result()
    with receiver:
        assert await receiver.receive(timeout=0.01) is None
        assert await registry.deliver(inbox_id, sent) is DeliveryStatus.DELIVERED
        assert await receiver.receive(timeout=0) == sent


async def test_closing_wakes_a_wait_in_progress() -> None:
    """A receiver closed (or cancelled) while someone waits on it ends that wait."""
    registry = InboxRegistry()
    inbox_id, receiver = registry.register()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_close_soon, registry, inbox_id)
        with anyio.fail_after(5):
            assert await receiver.receive(timeout=60) is None
    assert await registry.deliver(inbox_id, result()) is DeliveryStatus.ABANDONED


async def _close_soon(registry: InboxRegistry, inbox_id: InboxId) -> None:
    await anyio.sleep(0.01)
    assert registry.cancel(inbox_id) is True


async def test_a_second_delivery_to_the_same_id_is_abandoned() -> None:
    """An inbox takes one answer only."""
    registry = InboxRegistry()
    inbox_id, receiver = registry.register()
    with receiver:
        assert await registry.deliver(inbox_id, result()) is DeliveryStatus.DELIVERED
        assert await registry.deliver(inbox_id, result()) is DeliveryStatus.ABANDONED


async def test_stop_waiting_ends_the_waits_of_executions_not_committing() -> None:
    """stop_waiting() wakes every wait whose execution is not held, with nothing: a
    later delivery to it is abandoned (so its execution cannot commit); a held one
    still gets its answer."""
    registry = InboxRegistry()
    idle_id, idle = registry.register()
    held_id, held = registry.register()
    assert registry.hold(held_id)
    with idle, held:
        with anyio.fail_after(5):  # the wait would last 30 s without stop_waiting
            async with anyio.create_task_group() as tg:
                got: list[InboxResult | None] = []

                async def wait() -> None:
                    got.append(await idle.receive(timeout=30))

                tg.start_soon(wait)
                await anyio.sleep(0.01)
                assert registry.stop_waiting() == 1
        assert got == [None]
        assert registry.stopping
        assert not registry.waiting(idle_id)
        assert not registry.hold(idle_id)
        assert await registry.deliver(idle_id, result()) is DeliveryStatus.ABANDONED
        sent = result()
        assert await registry.deliver(held_id, sent) is DeliveryStatus.DELIVERED
        assert await held.receive(timeout=1) == sent
