"""While the database is away, every user-route request is refused 503, and the node
logs that in at most one line per ``UNAVAILABLE_LOG_SECONDS``, saying how many were
refused since the line before (not one line per request: 36 000 in 90 s)."""

from __future__ import annotations

import logging

import pytest

from orchestrator_core import routes
from picloud_shared.errors import Unavailable


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def refuse(refusals: routes.Refusals, n: int) -> None:
    for _ in range(n):
        answer = refusals.refused(Unavailable("the database is unavailable"))
        assert answer.status_code == 503
        assert answer.headers["retry-after"] == "1"


def test_refusals_are_logged_at_most_once_per_interval(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "picloud.routes")
    refusals = routes.Refusals(clock)
    refuse(refusals, 1000)
    assert [r.getMessage() for r in caplog.records] == ["user route: the database is unavailable"]
    clock.now += routes.UNAVAILABLE_LOG_SECONDS - 0.1
    refuse(refusals, 500)
    assert len(caplog.records) == 1
    clock.now += 0.1
    refuse(refusals, 1)
    assert len(caplog.records) == 2
    assert caplog.records[1].getMessage() == (
        "user route: the database is unavailable (1500 requests refused since the"
        " previous line; logged at most once per 10 s)"
    )
    clock.now += 3600  # a quiet hour: the next refusal is logged, with none before it
    refuse(refusals, 1)
    assert caplog.records[2].getMessage() == "user route: the database is unavailable"
    assert all(r.levelno == logging.WARNING for r in caplog.records)
