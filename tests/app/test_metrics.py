"""/metrics: the execution-duration histogram, and answers while the database is away."""

from __future__ import annotations

import logging
import math
import socket

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from manager_core.dispatch_settings import DURATION_BUCKETS, DispatcherMetrics
from picloud import metrics
from picloud.app import READY_CHECK_SECONDS, create_app
from picloud.services import Services, build_services
from picloud.settings import Settings
from tests.pg import PgServer

pytestmark = pytest.mark.anyio

UNREACHABLE = "postgresql+psycopg://picloud:secret@127.0.0.1:1/nowhere"


def _samples(text: str) -> dict[str, list[Sample]]:
    """The samples of each metric family of a scrape (parsing validates the text)."""
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def _value(text: str, name: str) -> float | None:
    values = [s.value for family in _samples(text).values() for s in family if s.name == name]
    assert len(values) <= 1
    return values[0] if values else None


async def _scrape(services: Services, times: int = 1) -> list[httpx.Response]:
    app = create_app(services)  # no lifespan: nothing is started
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://n") as c:
        return [await c.get("/metrics") for _ in range(times)]


def test_durations_fall_into_their_buckets() -> None:
    """Each ``duration_seconds.observe(kind, s)`` (what the dispatcher does) is one
    observation, counted in the first bucket whose bound is at least s."""
    m = DispatcherMetrics()
    for seconds in (0.001, 0.005, 0.2, 299.0, 301.0):
        m.duration_seconds.observe("kv", seconds)
    assert m.duration_seconds["kv"] == pytest.approx(0.001 + 0.005 + 0.2 + 299.0 + 301.0)
    counts = m.duration_seconds.buckets["kv"]
    assert len(counts) == len(DURATION_BUCKETS) + 1
    assert counts[DURATION_BUCKETS.index(0.005)] == 2  # 0.001 and 0.005 (le is inclusive)
    assert counts[DURATION_BUCKETS.index(0.25)] == 1
    assert counts[DURATION_BUCKETS.index(300.0)] == 1
    assert counts[-1] == 1  # above every bound
    assert sum(counts) == 5
    assert "http" not in m.duration_seconds.buckets


async def test_execution_durations_are_a_histogram_by_source_kind(db_url: str) -> None:
    """picloud_execution_duration_seconds is a Prometheus histogram per source kind:
    cumulative buckets up to +Inf, +Inf equal to _count, _sum the total seconds."""
    services = build_services(Settings(executor_max_workers=1), db_url, node_id="h-node")
    durations = services.dispatcher.metrics.duration_seconds
    for seconds in (0.004, 0.03, 0.03, 7.0):
        durations.observe("http", seconds)
    durations.observe("kv", 500.0)
    (response,) = await _scrape(services)
    await services.engine.dispose()
    assert response.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    family = families["picloud_execution_duration_seconds"]
    assert family.type == "histogram"
    buckets: dict[str, dict[float, float]] = {}
    totals: dict[tuple[str, str], float] = {}
    for sample in family.samples:
        kind = sample.labels["source_kind"]
        assert set(sample.labels) <= {"source_kind", "le"}
        if sample.name.endswith("_bucket"):
            buckets.setdefault(kind, {})[float(sample.labels["le"])] = sample.value
        else:
            totals[(kind, sample.name.rsplit("_", 1)[1])] = sample.value
    assert list(buckets["http"]) == [*DURATION_BUCKETS, math.inf]
    http = buckets["http"]
    assert http[0.005] == 1
    assert http[0.025] == 1
    assert http[0.05] == 3
    assert http[5.0] == 3
    assert http[10.0] == 4
    assert http[math.inf] == totals[("http", "count")] == 4
    values = list(http.values())
    assert values == sorted(values)  # cumulative
    assert totals[("http", "sum")] == pytest.approx(7.064)
    assert buckets["kv"][300.0] == 0
    assert buckets["kv"][math.inf] == totals[("kv", "count")] == 1
    assert totals[("kv", "sum")] == 500.0
    assert "picloud_execution_duration_seconds_total" not in response.text  # no clash


async def test_metrics_answer_while_the_database_never_answered(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the database unreachable from the start, /metrics still answers 200: no
    depth sample, picloud_outbox_depth_stale 1, and one warning line (no traceback),
    not one per scrape."""
    monkeypatch.setattr(metrics, "DEPTH_MAX_AGE_SECONDS", 0.0)
    services = build_services(Settings(executor_max_workers=1), UNREACHABLE, node_id="d-node")
    with caplog.at_level(logging.INFO):
        responses = await _scrape(services, times=3)
    await services.engine.dispose()
    for response in responses:
        assert response.status_code == 200
        assert _value(response.text, "picloud_outbox_depth") is None
        assert _value(response.text, "picloud_outbox_depth_stale") == 1.0
        assert _value(response.text, "picloud_gate_capacity") == 16.0
    logged = [r for r in caplog.records if r.name == "picloud.metrics"]
    assert len(logged) == 1
    assert logged[0].levelno == logging.WARNING
    assert logged[0].exc_info is None
    assert "\n" not in logged[0].getMessage()
    assert "outbox depth not read" in logged[0].getMessage()
    assert "secret" not in caplog.text
    assert "Traceback" not in caplog.text


async def test_a_lost_database_keeps_the_last_depth_marked_stale(
    pg_server: PgServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database goes away after a scrape: /metrics keeps answering with the last
    depth, stale; it logs one line a minute at most, and one when the database is back."""
    monkeypatch.setattr(metrics, "DEPTH_MAX_AGE_SECONDS", 0.0)
    name = pg_server.create_database(template=pg_server.template)
    services = build_services(Settings(executor_max_workers=1), pg_server.url(name), node_id="l")
    depth = metrics.OutboxDepth()
    try:
        assert await depth.get(services) == 0
        assert not depth.stale
        pg_server.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        pg_server.execute(
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
        )
        await services.engine.dispose()
        with caplog.at_level(logging.INFO, logger="picloud.metrics"):
            for _ in range(3):
                text = (await metrics.render(services, depth)).decode()
                assert _value(text, "picloud_outbox_depth") == 0.0
                assert _value(text, "picloud_outbox_depth_stale") == 1.0
            assert len(caplog.records) == 1
            monkeypatch.setattr(metrics, "DEPTH_FAILURE_LOG_SECONDS", 0.0)
            await depth.get(services)
            assert len(caplog.records) == 2  # once the interval passed: a line again
            assert "failed reads in a row: 4" in caplog.records[1].getMessage()
            pg_server.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            text = (await metrics.render(services, depth)).decode()
            assert _value(text, "picloud_outbox_depth_stale") == 0.0
            assert "read again" in caplog.records[-1].getMessage()
            assert all(r.exc_info is None for r in caplog.records)
    finally:
        await services.engine.dispose()
        pg_server.drop_database(name)


async def test_readyz_answers_within_its_bound_while_the_database_hangs() -> None:
    """A database that accepts connections and never answers (a stopped or frozen
    PostgreSQL): /readyz still answers, 503 "no answer within 3 s", and so does
    /metrics, with the depth marked stale."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        url = f"postgresql+psycopg://picloud:secret@127.0.0.1:{port}/frozen"
        services = build_services(Settings(executor_max_workers=1), url, node_id="f-node")
        app = create_app(services)  # no lifespan: the dispatcher is not running either
        transport = httpx.ASGITransport(app)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://n") as c:
                with anyio.fail_after(4 * READY_CHECK_SECONDS):
                    ready = await c.get("/readyz")
                    scraped = await c.get("/metrics")
        finally:
            await services.engine.dispose()
    assert ready.status_code == 503
    assert f"database: no answer within {READY_CHECK_SECONDS:g} s" in ready.json()["problems"]
    assert _value(scraped.text, "picloud_outbox_depth_stale") == 1.0
