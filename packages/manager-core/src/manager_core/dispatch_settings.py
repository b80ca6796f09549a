"""What the ``Dispatcher`` is configured with, what it counts, and what wakes it."""

from __future__ import annotations

from collections import Counter
from typing import Protocol

import attrs


class WorkSignal(Protocol):
    """The in-process wake-up: producers on this node ``notify`` after commit."""

    def notify(self) -> None: ...

    async def wait(self, timeout: float) -> None: ...


@attrs.frozen
class DispatcherSettings:
    node_id: str
    poll_interval: float = 0.1
    batch_size: int = 64
    max_trigger_depth: int = 8
    lease_seconds: float = 60.0
    shutdown_grace: float = 10.0
    max_conflict_reruns: int = 100
    recover_interval: float = 1.0
    claim_linger: float = 0.002  # see Dispatcher._gather_slots
    completion_linger: float = 0.002  # see completer.BatchCompleter


@attrs.define
class DispatcherMetrics:
    """Counters the binary exposes on ``/metrics``."""

    executions: Counter[tuple[str, str]] = attrs.Factory(Counter)  # (source_kind, outcome)
    duration_seconds: Counter[str] = attrs.Factory(Counter)  # source_kind → total seconds
    retries: int = 0
    dead_letters: int = 0
    skipped_for_depth: int = 0
    abandoned: int = 0
    conflict_reruns: int = 0
    claimed: int = 0
    claim_batches: int = 0
    handed_off: int = 0  # rows written claimed by this node and run without a claim
