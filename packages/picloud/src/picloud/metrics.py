"""``GET /metrics``: Prometheus text built fresh at each scrape.

Counters come from the dispatcher's in-process ``DispatcherMetrics`` and the gate;
the outbox depth is read from PostgreSQL at scrape time, at most once a second.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from manager_core import tables as t

if TYPE_CHECKING:
    from collections.abc import Iterator

    from prometheus_client.metrics_core import Metric

    from picloud.services import Services


class _Snapshot(Collector):
    def __init__(self, services: Services, outbox_depth: int) -> None:
        self._s = services
        self._depth = outbox_depth

    def collect(self) -> Iterator[Metric]:
        m = self._s.dispatcher.metrics
        executions = CounterMetricFamily(
            "picloud_executions",
            "Executions finished, by source kind and outcome",
            labels=["source_kind", "outcome"],
        )
        for (kind, outcome), n in sorted(m.executions.items()):
            executions.add_metric([kind, outcome], n)
        yield executions
        duration = CounterMetricFamily(
            "picloud_execution_duration_seconds",
            "Total time spent dispatching executions",
            labels=["source_kind"],
        )
        for kind, seconds in sorted(m.duration_seconds.items()):
            duration.add_metric([kind], seconds)
        yield duration
        written, written_rows = self._s.outbox.write_batches
        completed, completed_rows = self._s.dispatcher.completion_batches
        for name, help_text, value in (
            ("picloud_retries", "Executions rescheduled for a retry", m.retries),
            ("picloud_dead_letters", "Executions dead-lettered", m.dead_letters),
            (
                "picloud_skipped_for_depth",
                "Executions skipped: trigger depth limit",
                m.skipped_for_depth,
            ),
            ("picloud_abandoned", "Sync answers whose caller was gone", m.abandoned),
            (
                "picloud_conflict_reruns",
                "Transparent re-runs after a serialization conflict",
                m.conflict_reruns,
            ),
            (
                "picloud_gate_saturation",
                "Admissions refused by a full execution gate",
                self._s.gate.saturation_count,
            ),
            (
                "picloud_body_budget_refusals",
                "User-route requests refused (503): no room for their body in time",
                self._s.orchestrator.body_budget.refusals,
            ),
            # Statements against rows: how well the outbox's batching works under load.
            ("picloud_outbox_claims", "Claim statements run", m.claim_batches),
            ("picloud_outbox_claimed_rows", "Outbox rows claimed", m.claimed),
            (
                "picloud_outbox_handed_off_rows",
                "Rows written already claimed by this node and run without a claim",
                m.handed_off,
            ),
            ("picloud_outbox_write_batches", "Group-committed outbox writes", written),
            ("picloud_outbox_written_rows", "Rows those writes carried", written_rows),
            (
                "picloud_completion_batches",
                "Group-committed completions of executions that wrote nothing",
                completed,
            ),
            ("picloud_completed_rows", "Executions those completions carried", completed_rows),
            (
                "picloud_executions_pruned",
                "Finished execution records deleted past their retention",
                0 if self._s.retention is None else self._s.retention.pruned,
            ),
            (
                "picloud_storage_compactions",
                "Passes that folded storage deltas into the apps' usage",
                self._s.compactor.runs,
            ),
            (
                "picloud_storage_deltas_folded",
                "Storage delta rows (one per write) folded into the apps' usage",
                self._s.compactor.folded,
            ),
            (
                "picloud_dead_letters_pruned",
                "Settled dead letters deleted past their retention",
                0 if self._s.retention is None else self._s.retention.pruned_dead_letters,
            ),
        ):
            yield CounterMetricFamily(name, help_text, value=value)
        yield GaugeMetricFamily(
            "picloud_outbox_depth", "Rows waiting in the outbox", value=self._depth
        )
        yield GaugeMetricFamily(
            "picloud_executions_in_flight",
            "Executions holding a gate slot",
            value=self._s.gate.in_use,
        )
        yield GaugeMetricFamily(
            "picloud_gate_capacity",
            "Concurrent executions allowed on this node",
            value=self._s.gate.capacity,
        )
        budget = self._s.orchestrator.body_budget
        yield GaugeMetricFamily(
            "picloud_body_bytes_in_flight",
            "User-route request body bytes held right now (their share of the budget)",
            value=budget.in_use,
        )
        yield GaugeMetricFamily(
            "picloud_body_budget_bytes",
            "User-route request body bytes a node holds at most",
            value=budget.capacity,
        )


# ``/metrics`` needs no token: the outbox is counted at most once a second, however
# often it is scraped (a count reads the whole outbox, which a backlog makes long).
DEPTH_MAX_AGE_SECONDS = 1.0


class OutboxDepth:
    """The outbox's row count, read again once it is ``DEPTH_MAX_AGE_SECONDS`` old."""

    def __init__(self) -> None:
        self._read_at = -math.inf
        self._depth = 0

    async def get(self, services: Services) -> int:
        if time.monotonic() - self._read_at >= DEPTH_MAX_AGE_SECONDS:
            async with services.engine.connect() as conn:
                count = select(func.count()).select_from(t.outbox)
                self._depth = int((await conn.execute(count)).scalar_one())
            self._read_at = time.monotonic()
        return self._depth


async def render(services: Services, depth: OutboxDepth) -> bytes:
    """The Prometheus exposition text for this node."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(services, await depth.get(services)))
    return generate_latest(registry)
