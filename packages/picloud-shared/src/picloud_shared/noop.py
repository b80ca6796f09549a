"""Bootstrap implementations that do nothing, for wiring before the real ones."""

from __future__ import annotations

from picloud_shared.events import TriggerEvent
from picloud_shared.ids import AppId, InboxId
from picloud_shared.inbox import DeliveryStatus, InboxResult


class NoopEventEmitter:
    """An :class:`~picloud_shared.ports.EventEmitter` that writes nothing."""

    async def emit(
        self, conn: object, app_id: AppId, event: TriggerEvent, trigger_depth: int
    ) -> int:
        return 0


class UnboundedBacklog:
    """An :class:`~picloud_shared.ports.AsyncBacklog` that admits every request."""

    def admit(self, app_id: AppId) -> bool:
        return True


class NoopInboxResolver:
    """An :class:`~picloud_shared.ports.InboxResolver` with no receivers:
    every delivery comes back ``ABANDONED``."""

    async def deliver(
        self, inbox_id: InboxId, result: InboxResult, reply_node: str | None = None
    ) -> DeliveryStatus:
        return DeliveryStatus.ABANDONED

    def waiting(self, inbox_id: InboxId) -> bool:
        return False

    def hold(self, inbox_id: InboxId) -> bool:
        return False
