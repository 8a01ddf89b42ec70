"""Circuit breaking: Envoy's per-cluster limits on connections, pending
requests, requests and retries in flight, so one slow service cannot take the
whole node proxy's capacity.

The proxy asks ``try_acquire`` before it opens, queues or sends, and calls
``release`` when that thing ends. What a refusal means follows Envoy:
- REQUESTS or PENDING_REQUESTS: fail the request with 503 and response flag
  UO (``UPSTREAM_OVERFLOW_FLAG``);
- RETRIES: do not retry; the client gets the last upstream response;
- CONNECTIONS: open no new connection; the request waits as pending for one
  already open.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from dataplane.policy.retry import RetryBudget

UPSTREAM_OVERFLOW_FLAG = "UO"


class Resource(Enum):
    CONNECTIONS = "connections"
    PENDING_REQUESTS = "pending_requests"
    REQUESTS = "requests"
    RETRIES = "retries"


@dataclass(frozen=True)
class CircuitBreakerConfig:
    """Envoy's CircuitBreakers.Thresholds (default priority), with its defaults.
    A ``retry_budget``, when set, replaces ``max_retries`` as in Envoy."""

    max_connections: int = 1024
    max_pending_requests: int = 1024
    max_requests: int = 1024
    max_retries: int = 3
    retry_budget: RetryBudget | None = None

    def __post_init__(self) -> None:
        for name in ("max_connections", "max_pending_requests", "max_requests", "max_retries"):
            if getattr(self, name) < 0:
                raise ValueError(f"circuit breaker {name} must not be negative, got {getattr(self, name)}")


class CircuitBreaker:
    """The live counts of one cluster against its ``CircuitBreakerConfig``."""

    def __init__(self, config: CircuitBreakerConfig | None = None) -> None:
        self.config = config if config is not None else CircuitBreakerConfig()
        self._active = dict.fromkeys(Resource, 0)
        self._overflows = dict.fromkeys(Resource, 0)

    def limit(self, kind: Resource) -> int:
        """The current limit for ``kind``; with a retry budget, the retry limit
        moves with the requests active and pending."""
        if kind is Resource.RETRIES and self.config.retry_budget is not None:
            return self.config.retry_budget.limit(self._active[Resource.REQUESTS],
                                                  self._active[Resource.PENDING_REQUESTS])
        return {Resource.CONNECTIONS: self.config.max_connections,
                Resource.PENDING_REQUESTS: self.config.max_pending_requests,
                Resource.REQUESTS: self.config.max_requests,
                Resource.RETRIES: self.config.max_retries}[kind]

    def try_acquire(self, kind: Resource) -> bool:
        """Take one ``kind`` if under the limit; otherwise count an overflow."""
        if self._active[kind] >= self.limit(kind):
            self._overflows[kind] += 1
            return False
        self._active[kind] += 1
        return True

    def release(self, kind: Resource) -> None:
        if self._active[kind] == 0:
            raise ValueError(f"release({kind.name}) without a matching try_acquire: "
                             "every acquired resource must be released exactly once")
        self._active[kind] -= 1

    def active(self, kind: Resource) -> int:
        return self._active[kind]

    def remaining(self, kind: Resource) -> int:
        """How many more ``kind`` may be taken now (Envoy's remaining_* gauges)."""
        return max(0, self.limit(kind) - self._active[kind])

    def is_open(self, kind: Resource) -> bool:
        """Whether the breaker for ``kind`` is at its limit (Envoy's *_open gauges)."""
        return self._active[kind] >= self.limit(kind)

    def overflows(self, kind: Resource) -> int:
        """Refusals so far: for CONNECTIONS Envoy's upstream_cx_overflow, for
        PENDING_REQUESTS and REQUESTS upstream_rq_pending_overflow (summed
        there), for RETRIES upstream_rq_retry_overflow."""
        return self._overflows[kind]
