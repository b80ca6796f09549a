"""Retry policies and the backoff delay function.

``delay_ms(policy, attempt, rand)`` is pure: ``rand`` is a number in ``[0, 1)``
supplied by the caller (``random.random()`` in production, fixed in tests), so the
jitter is testable. The result is always within ``[0, policy.max_delay_ms]``.
"""

from __future__ import annotations

import enum
from typing import Any

import attrs

from picloud_shared import wire
from picloud_shared.errors import InvalidRetryPolicy
from picloud_shared.limits import MAX_RETRY_ATTEMPTS
from picloud_shared.wire import JsonObject, WireError

# An attempt number past this cannot change an exponential delay any more (2**63
# already exceeds every representable cap), so the exponent is clamped to it.
_MAX_EXPONENT = 63


class Backoff(enum.StrEnum):
    EXPONENTIAL = "exponential"
    LINEAR = "linear"
    CONSTANT = "constant"


def _non_negative(instance: Any, attribute: Any, value: int) -> None:
    if value < 0:
        raise InvalidRetryPolicy(f"{attribute.name} must be >= 0")


@attrs.frozen
class RetryPolicy:
    """How a trigger execution is retried (API.md, ``retry``)."""

    backoff: Backoff = Backoff.EXPONENTIAL
    base_delay_ms: int = attrs.field(default=1000, validator=_non_negative)
    max_delay_ms: int = attrs.field(default=300_000, validator=_non_negative)
    max_attempts: int = 5
    jitter: float = 0.2

    def __attrs_post_init__(self) -> None:
        if self.max_delay_ms < self.base_delay_ms:
            raise InvalidRetryPolicy("max_delay_ms must be >= base_delay_ms")
        if not 1 <= self.max_attempts <= MAX_RETRY_ATTEMPTS:
            raise InvalidRetryPolicy(f"max_attempts must be between 1 and {MAX_RETRY_ATTEMPTS}")
        if not 0.0 <= self.jitter <= 1.0:
            raise InvalidRetryPolicy("jitter must be between 0 and 1")
        if self.max_delay_ms > 7 * 24 * 3600 * 1000:
            raise InvalidRetryPolicy("max_delay_ms must be at most one week")

    def base_for(self, attempt: int) -> float:
        """The delay before retry number ``attempt`` (1-based), without jitter, capped."""
        n = max(attempt, 1)
        if self.backoff is Backoff.CONSTANT:
            raw = float(self.base_delay_ms)
        elif self.backoff is Backoff.LINEAR:
            raw = float(self.base_delay_ms) * n
        else:
            raw = float(self.base_delay_ms) * 2.0 ** min(n - 1, _MAX_EXPONENT)
        return min(raw, float(self.max_delay_ms))

    def delay_ms(self, attempt: int, rand: float) -> float:
        """Delay before retry ``attempt``: ``rand`` (in [0, 1]) placed in
        :meth:`jitter_band` (``base * (1 + jitter*(2*rand-1))`` where no cap cuts it)."""
        low, high = self.jitter_band(attempt)
        return low + (high - low) * rand

    def jitter_band(self, attempt: int) -> tuple[float, float]:
        """The closed interval every ``delay_ms(attempt, ·)`` falls in: ``base`` ±
        ``jitter``, its top cut at ``max_delay_ms``. Delays are spread evenly over what
        is left: clamping them instead would put half the retries that reached the cap
        at exactly the cap, together, which is what jitter is there to prevent."""
        base = self.base_for(attempt)
        return (
            max(base * (1.0 - self.jitter), 0.0),
            min(base * (1.0 + self.jitter), float(self.max_delay_ms)),
        )

    def to_wire(self) -> JsonObject:
        return {
            "backoff": self.backoff.value,
            "base_delay_ms": self.base_delay_ms,
            "max_delay_ms": self.max_delay_ms,
            "max_attempts": self.max_attempts,
            "jitter": self.jitter,
        }

    @classmethod
    def from_wire(cls, data: object) -> RetryPolicy:
        """Decode a (possibly partial) ``retry`` object; missing fields take the defaults.

        Raises :class:`InvalidRetryPolicy` on unknown fields, wrong types or values.
        """
        try:
            d = wire.obj(data, "retry")
            unknown = set(d) - {
                "backoff",
                "base_delay_ms",
                "max_delay_ms",
                "max_attempts",
                "jitter",
            }
            if unknown:
                raise InvalidRetryPolicy(f"unknown retry field(s): {', '.join(sorted(unknown))}")
            kwargs: dict[str, Any] = {}
            if "backoff" in d:
                kwargs["backoff"] = wire.enum_value(Backoff, d["backoff"])
            for name in ("base_delay_ms", "max_delay_ms", "max_attempts"):
                if name in d:
                    kwargs[name] = wire.field(d, name, int)
            if "jitter" in d:
                try:
                    kwargs["jitter"] = float(wire.field(d, "jitter", (int, float)))
                except OverflowError:
                    raise InvalidRetryPolicy("jitter must be between 0 and 1") from None
            return cls(**kwargs)
        except WireError as exc:
            raise InvalidRetryPolicy(f"invalid retry policy: {exc}") from exc


DEFAULT_RETRY_POLICY = RetryPolicy()
