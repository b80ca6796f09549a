"""Backoff properties (issue: foundation §3)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from picloud_shared.errors import InvalidRetryPolicy
from picloud_shared.retry import DEFAULT_RETRY_POLICY, Backoff, RetryPolicy
from tests.strategies import retry_policies

attempts = st.integers(min_value=1, max_value=10**6)
rands = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)


@given(retry_policies(), attempts, rands)
def test_delay_is_never_negative_nor_above_the_cap(
    policy: RetryPolicy, attempt: int, r: float
) -> None:
    """Jitter included, every delay lies in [0, max_delay_ms]; no overflow for huge attempts."""
    d = policy.delay_ms(attempt, r)
    assert 0.0 <= d <= policy.max_delay_ms


@given(retry_policies(), attempts, rands)
def test_jitter_stays_inside_its_band(policy: RetryPolicy, attempt: int, r: float) -> None:
    """A jittered delay is within base*(1±jitter), clipped to the cap."""
    lo, hi = policy.jitter_band(attempt)
    d = policy.delay_ms(attempt, r)
    assert lo - 1e-6 <= d <= hi + 1e-6


@given(retry_policies().filter(lambda p: p.backoff is not Backoff.CONSTANT), attempts)
def test_exponential_and_linear_never_decrease_without_jitter(
    policy: RetryPolicy, attempt: int
) -> None:
    """Without jitter, the next retry never waits less than the one before."""
    assert policy.base_for(attempt + 1) >= policy.base_for(attempt)


@given(retry_policies().filter(lambda p: p.backoff is Backoff.CONSTANT), attempts, attempts)
def test_constant_is_constant(policy: RetryPolicy, a: int, b: int) -> None:
    """A constant policy's un-jittered delay never depends on the attempt."""
    assert policy.base_for(a) == policy.base_for(b) == policy.base_delay_ms


def test_jitter_spreads_retries_that_reached_the_cap_below_it() -> None:
    """At the cap the band is cut, and delays spread evenly over what is left of it,
    not clamped: not half of the retries there at exactly the cap."""
    policy = RetryPolicy(Backoff.CONSTANT, 1000, 1000, 5, 0.5)
    delays = [policy.delay_ms(1, r / 100) for r in range(101)]
    assert policy.jitter_band(1) == (500.0, 1000.0)
    assert sum(d == 1000 for d in delays) == 1
    assert delays == sorted(set(delays))
    below = RetryPolicy(Backoff.EXPONENTIAL, 100, 300_000, 5, 0.2)
    assert below.jitter_band(1) == (80.0, 120.0)  # far from the cap: base ± jitter
    capped = RetryPolicy(Backoff.EXPONENTIAL, 1000, 2000, 5, 0.2)
    assert capped.jitter_band(4) == (1600.0, 2000.0)  # 8000 capped to 2000, then ± 20 %


def test_exponential_doubles_until_the_cap() -> None:
    """1000, 2000, 4000 … then the cap."""
    p = RetryPolicy(Backoff.EXPONENTIAL, 1000, 5000, 5, 0.0)
    assert [p.delay_ms(n, 0.5) for n in range(1, 6)] == [1000, 2000, 4000, 5000, 5000]


def test_linear_grows_by_the_base() -> None:
    """base, 2·base, 3·base."""
    p = RetryPolicy(Backoff.LINEAR, 100, 10_000, 5, 0.0)
    assert [p.delay_ms(n, 0.99) for n in (1, 2, 3)] == [100, 200, 300]


def test_defaults_are_those_of_the_api() -> None:
    """exponential, 1000, 300000, 5, 0.2 (API.md)."""
    assert DEFAULT_RETRY_POLICY.to_wire() == {
        "backoff": "exponential",
        "base_delay_ms": 1000,
        "max_delay_ms": 300000,
        "max_attempts": 5,
        "jitter": 0.2,
    }


def test_partial_wire_form_fills_defaults() -> None:
    """A partial retry object takes the defaults for what it omits."""
    p = RetryPolicy.from_wire({"max_attempts": 2, "backoff": "constant"})
    assert (p.max_attempts, p.backoff, p.base_delay_ms) == (2, Backoff.CONSTANT, 1000)


@pytest.mark.parametrize(
    "bad",
    [
        {"backoff": "fibonacci"},
        {"max_attempts": 0},
        {"max_attempts": 101},
        {"jitter": 1.5},
        {"jitter": -0.1},
        {"jitter": 10**400},  # too big for a float
        {"base_delay_ms": -1},
        {"base_delay_ms": 10, "max_delay_ms": 5},
        {"max_attempts": "3"},
        {"max_attempts": True},
        {"surprise": 1},
        [],
    ],
)
def test_invalid_policies_are_rejected(bad: object) -> None:
    """Each malformed retry object raises InvalidRetryPolicy (a 422)."""
    with pytest.raises(InvalidRetryPolicy):
        RetryPolicy.from_wire(bad)


@given(retry_policies())
def test_policy_round_trips_through_its_wire_form(policy: RetryPolicy) -> None:
    """to_wire then from_wire gives the same policy."""
    assert RetryPolicy.from_wire(policy.to_wire()) == policy
