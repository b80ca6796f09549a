"""What the ``Dispatcher`` is configured with, what it counts, and what wakes it."""

from __future__ import annotations

from bisect import bisect_left
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


#: Upper bounds (seconds) of the execution-duration histogram's buckets.
DURATION_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0
)  # fmt: skip


class DurationTotals(Counter[str]):
    """Seconds spent per source kind, summed, and the histogram of the observations
    (:meth:`observe`): ``buckets[kind][i]`` counts those of at most
    ``DURATION_BUCKETS[i]`` seconds and above the one before (not cumulative); the
    last entry counts those above every bound."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.buckets: dict[str, list[int]] = {}
        super().__init__(*args, **kwargs)

    def observe(self, kind: str, seconds: float) -> None:
        """One execution of ``kind`` took ``seconds``."""
        self[kind] += seconds
        counts = self.buckets.get(kind)
        if counts is None:
            counts = self.buckets[kind] = [0] * (len(DURATION_BUCKETS) + 1)
        counts[bisect_left(DURATION_BUCKETS, seconds)] += 1


@attrs.define
class DispatcherMetrics:
    """Counters the binary exposes on ``/metrics``."""

    executions: Counter[tuple[str, str]] = attrs.Factory(Counter)  # (source_kind, outcome)
    duration_seconds: DurationTotals = attrs.Factory(DurationTotals)  # source_kind → seconds
    retries: int = 0
    dead_letters: int = 0
    skipped_for_depth: int = 0
    abandoned: int = 0
    conflict_reruns: int = 0
    claimed: int = 0
    claim_batches: int = 0
    handed_off: int = 0  # rows written claimed by this node and run without a claim
