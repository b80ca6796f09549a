"""``GET /metrics``: Prometheus text built fresh at each scrape.

Counters come from the dispatcher's in-process ``DispatcherMetrics`` and the gate;
the outbox depth is read from PostgreSQL at scrape time, at most once a second. While
the database does not answer, ``/metrics`` still does: with the last depth read (none
before the first) and ``picloud_outbox_depth_stale 1``.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

import anyio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from sqlalchemy import func, select

from manager_core import tables as t
from manager_core.dispatch_settings import DURATION_BUCKETS

if TYPE_CHECKING:
    from collections.abc import Iterator

    from prometheus_client.metrics_core import Metric

    from picloud.services import Services


log = logging.getLogger("picloud.metrics")


class _Snapshot(Collector):
    def __init__(self, services: Services, outbox_depth: int | None, stale: bool) -> None:
        self._s = services
        self._depth = outbox_depth
        self._stale = stale

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
        duration = HistogramMetricFamily(
            "picloud_execution_duration_seconds",
            "Time spent dispatching an execution, by source kind",
            labels=["source_kind"],
        )
        for kind, seconds in sorted(m.duration_seconds.items()):
            counts = m.duration_seconds.buckets.get(kind, [0] * (len(DURATION_BUCKETS) + 1))
            cumulative = 0
            buckets = []
            for bound, n in zip((*DURATION_BUCKETS, math.inf), counts, strict=True):
                cumulative += n
                buckets.append((floatToGoString(bound), cumulative))
            duration.add_metric([kind], buckets, sum_value=seconds)
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
                "picloud_backlog_refusals",
                "Async user-route requests refused (503): their app had"
                " PICLOUD_MAX_QUEUED_EXECUTIONS_PER_APP executions queued",
                self._s.backlog.refusals,
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
        depth = GaugeMetricFamily("picloud_outbox_depth", "Rows waiting in the outbox")
        if self._depth is not None:  # none until the database answered once
            depth.add_metric([], self._depth)
        yield depth
        yield GaugeMetricFamily(
            "picloud_outbox_depth_stale",
            "1 when the last read of the outbox depth failed (the database did not answer)",
            value=int(self._stale),
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
# A read that takes longer counts as failed: a scrape never waits long on the database.
DEPTH_READ_TIMEOUT_SECONDS = 3.0
# While reads keep failing, one log line per minute says so.
DEPTH_FAILURE_LOG_SECONDS = 60.0


class OutboxDepth:
    """The outbox's row count, read again once it is ``DEPTH_MAX_AGE_SECONDS`` old.

    A failed read keeps the last count (``None`` before the first) and sets ``stale``;
    it is logged in one line, at most once per ``DEPTH_FAILURE_LOG_SECONDS``."""

    def __init__(self) -> None:
        self._read_at = -math.inf
        self._depth: int | None = None
        self.stale = False
        self._logged_at = -math.inf
        self._failures = 0  # in a row

    async def get(self, services: Services) -> int | None:
        if time.monotonic() - self._read_at >= DEPTH_MAX_AGE_SECONDS:
            self._read_at = time.monotonic()  # concurrent scrapes reuse, not pile up
            try:
                with anyio.fail_after(DEPTH_READ_TIMEOUT_SECONDS):
                    async with services.engine.connect() as conn:
                        count = select(func.count()).select_from(t.outbox)
                        self._depth = int((await conn.execute(count)).scalar_one())
            except Exception as exc:  # the database is away: serve what we have
                self._failed(exc)
            else:
                if self.stale:
                    log.info("outbox depth read again: the database answers")
                self.stale = False
                self._logged_at = -math.inf
                self._failures = 0
        return self._depth

    def _failed(self, exc: Exception) -> None:
        self.stale = True
        self._failures += 1
        now = time.monotonic()
        if now - self._logged_at < DEPTH_FAILURE_LOG_SECONDS:
            return
        why = (str(exc).strip().splitlines() or [""])[0][:200]
        log.warning(
            "outbox depth not read (%s%s): /metrics serves the last one as stale"
            " (failed reads in a row: %d; logged at most once a minute)",
            type(exc).__name__,
            f": {why}" if why else "",
            self._failures,
        )
        self._logged_at = now


async def render(services: Services, depth: OutboxDepth) -> bytes:
    """The Prometheus exposition text for this node."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(services, await depth.get(services), depth.stale))
    return generate_latest(registry)
