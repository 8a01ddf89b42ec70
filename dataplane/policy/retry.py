"""Retry decisions: whether a failed attempt may be tried again, from Envoy's
route ``retry_policy`` (``retry_on``, ``num_retries``, ``per_try_timeout``,
back-off) plus the safety rules a proxy needs to never replay what it must not.

The router asks ``decide`` after each attempt; how many retries may run at once
is the circuit breaker's business (``max_retries`` or the ``RetryBudget``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from enum import Enum, StrEnum


class RetryOn(StrEnum):
    """Envoy's ``retry_on`` conditions (HTTP and gRPC) that we implement."""

    FIVE_XX = "5xx"
    GATEWAY_ERROR = "gateway-error"
    RESET = "reset"
    RESET_BEFORE_REQUEST = "reset-before-request"
    CONNECT_FAILURE = "connect-failure"
    REFUSED_STREAM = "refused-stream"
    RETRIABLE_4XX = "retriable-4xx"
    RETRIABLE_STATUS_CODES = "retriable-status-codes"
    CANCELLED = "cancelled"
    DEADLINE_EXCEEDED = "deadline-exceeded"
    INTERNAL = "internal"
    RESOURCE_EXHAUSTED = "resource-exhausted"
    UNAVAILABLE = "unavailable"


# gRPC status codes of the gRPC conditions.
_GRPC_CODES = {RetryOn.CANCELLED: 1, RetryOn.DEADLINE_EXCEEDED: 4, RetryOn.RESOURCE_EXHAUSTED: 8,
               RetryOn.INTERNAL: 13, RetryOn.UNAVAILABLE: 14}


def parse_retry_on(value: str) -> frozenset[RetryOn]:
    """Envoy's comma-separated ``retry_on`` string as a set of conditions."""
    conditions = set()
    for name in (part.strip() for part in value.split(",")):
        if not name:
            continue
        try:
            conditions.add(RetryOn(name))
        except ValueError:
            supported = ", ".join(c.value for c in RetryOn)
            raise ValueError(f"retry_on {name!r} is not a supported retry condition "
                             f"(in {value!r}): use any of {supported}") from None
    return frozenset(conditions)


class Failure(Enum):
    """How an attempt failed when no response headers came back."""

    CONNECT_FAILURE = "connect_failure"  # no connection: the request was never sent
    RESET_BEFORE_REQUEST = "reset_before_request"  # reset before the request headers went out
    REFUSED_STREAM = "refused_stream"  # HTTP/2 REFUSED_STREAM: the server did not process it
    RESET = "reset"  # reset or disconnect after the request was sent
    PER_TRY_TIMEOUT = "per_try_timeout"  # no response headers within per_try_timeout
    OVERFLOW = "overflow"  # refused by our own circuit breaker (UO): never retried, as Envoy


# Which conditions retry each failure, as Envoy's router: 5xx and gateway-error
# count any failure without a response as a would-be 503/504.
_FAILURE_CONDITIONS: dict[Failure, frozenset[RetryOn]] = {
    Failure.CONNECT_FAILURE: frozenset({RetryOn.FIVE_XX, RetryOn.GATEWAY_ERROR, RetryOn.RESET,
                                        RetryOn.CONNECT_FAILURE, RetryOn.RESET_BEFORE_REQUEST}),
    Failure.RESET_BEFORE_REQUEST: frozenset({RetryOn.FIVE_XX, RetryOn.GATEWAY_ERROR, RetryOn.RESET,
                                             RetryOn.RESET_BEFORE_REQUEST}),
    Failure.REFUSED_STREAM: frozenset({RetryOn.FIVE_XX, RetryOn.GATEWAY_ERROR, RetryOn.RESET,
                                       RetryOn.REFUSED_STREAM}),
    Failure.RESET: frozenset({RetryOn.FIVE_XX, RetryOn.GATEWAY_ERROR, RetryOn.RESET}),
    Failure.PER_TRY_TIMEOUT: frozenset({RetryOn.FIVE_XX, RetryOn.GATEWAY_ERROR, RetryOn.RESET}),
    Failure.OVERFLOW: frozenset(),
}

# Failures after which the upstream provably did not process the request, so
# even a non-idempotent request may go again.
_NOT_PROCESSED = frozenset({Failure.CONNECT_FAILURE, Failure.RESET_BEFORE_REQUEST, Failure.REFUSED_STREAM})

# RFC 9110 section 9.2.2.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


@dataclass(frozen=True)
class Outcome:
    """What one attempt came to: response headers (``status``, and
    ``grpc_status`` when it is in the headers, a trailers-only reply), or a
    ``failure``. As in Envoy, a grpc-status in trailers cannot be retried: the
    response is already on its way to the client."""

    status: int | None = None
    grpc_status: int | None = None
    failure: Failure | None = None

    def __post_init__(self) -> None:
        if (self.status is None) == (self.failure is None):
            raise ValueError("an attempt outcome is either a response status or a failure, not both")

    @classmethod
    def response(cls, status: int, grpc_status: int | None = None) -> Outcome:
        return cls(status=status, grpc_status=grpc_status)

    @classmethod
    def failed(cls, failure: Failure) -> Outcome:
        return cls(failure=failure)


class RetryDecision(Enum):
    RETRY = "retry"
    NOT_RETRIABLE = "not_retriable"  # success, or a failure no configured condition covers
    UNSAFE = "unsafe"  # covered, but a replay could repeat a non-idempotent request or lose body bytes
    RETRIES_EXHAUSTED = "retries_exhausted"  # covered and safe, but num_retries are spent (flag URX)


@dataclass(frozen=True)
class RetryBackOff:
    """Envoy's RetryPolicy.retry_back_off, in seconds: full-jitter exponential,
    base 25 ms, capped at 10 x base unless set."""

    base_interval: float = 0.025
    max_interval: float | None = None

    def __post_init__(self) -> None:
        if self.base_interval <= 0:
            raise ValueError(f"retry back-off base_interval must be positive, got {self.base_interval}")
        if self.max_interval is not None and self.max_interval < self.base_interval:
            raise ValueError(f"retry back-off max_interval ({self.max_interval}) must be at least "
                             f"base_interval ({self.base_interval})")

    @property
    def cap(self) -> float:
        return self.max_interval if self.max_interval is not None else 10 * self.base_interval

    def delay(self, retry: int, rng: random.Random) -> float:
        """The wait before retry number ``retry`` (1 for the first): uniform in
        [0, (2^retry - 1) x base), the upper end capped."""
        upper = min((2 ** min(retry, 62) - 1) * self.base_interval, self.cap)
        return rng.random() * upper


@dataclass(frozen=True)
class RetryPolicy:
    """Envoy's route RetryPolicy. The default retries nothing: Envoy retries
    only when ``retry_on`` is configured, and then once (``num_retries`` 1).
    ``retriable_status_codes`` count only with the ``retriable-status-codes``
    condition, as in Envoy. ``per_try_timeout`` is in seconds."""

    retry_on: frozenset[RetryOn] = frozenset()
    num_retries: int = 1
    per_try_timeout: float | None = None
    retriable_status_codes: frozenset[int] = frozenset()
    back_off: RetryBackOff = field(default_factory=RetryBackOff)

    def __post_init__(self) -> None:
        if self.num_retries < 0:
            raise ValueError(f"retry num_retries must not be negative, got {self.num_retries}")
        if self.per_try_timeout is not None and self.per_try_timeout <= 0:
            raise ValueError(f"retry per_try_timeout must be positive, got {self.per_try_timeout}")

    @classmethod
    def from_envoy(cls, retry_on: str, num_retries: int = 1, per_try_timeout: float | None = None,
                   retriable_status_codes: frozenset[int] = frozenset(),
                   back_off: RetryBackOff | None = None) -> RetryPolicy:
        """A policy from the fields of an Envoy RetryPolicy (``retry_on`` as its string)."""
        return cls(parse_retry_on(retry_on), num_retries, per_try_timeout, frozenset(retriable_status_codes),
                   back_off if back_off is not None else RetryBackOff())

    def matches(self, outcome: Outcome) -> bool:
        """Whether a configured condition covers ``outcome``, safety aside."""
        if outcome.failure is not None:
            return bool(self.retry_on & _FAILURE_CONDITIONS[outcome.failure])
        status = outcome.status
        assert status is not None
        if RetryOn.FIVE_XX in self.retry_on and 500 <= status <= 599:
            return True
        if RetryOn.GATEWAY_ERROR in self.retry_on and status in (502, 503, 504):
            return True
        if RetryOn.RETRIABLE_4XX in self.retry_on and status == 409:
            return True
        if RetryOn.RETRIABLE_STATUS_CODES in self.retry_on and status in self.retriable_status_codes:
            return True
        return self._grpc_matches(outcome)

    def _grpc_matches(self, outcome: Outcome) -> bool:
        return outcome.grpc_status is not None and any(
            c in self.retry_on and code == outcome.grpc_status for c, code in _GRPC_CODES.items())

    def decide(self, attempt: int, outcome: Outcome, method: str, idempotent: bool | None = None,
               body_replayable: bool = True) -> RetryDecision:
        """Whether to retry after attempt number ``attempt`` (1 = the first try).

        Beyond Envoy, which replays any request its retry_on covers, a retry
        must also be safe:
        - ``body_replayable`` False (body bytes already streamed upstream and
          not kept) forbids any retry;
        - a non-idempotent request (``idempotent`` None derives it from
          ``method``, RFC 9110) goes again only when the upstream provably did
          not process it: connect failure, reset before the request was sent,
          REFUSED_STREAM. A configured gRPC status is the exception: listing
          it is the service owner declaring the call retryable, as gRPC's own
          retry policy (gRFC A6) has it, though every gRPC call is a POST.
        """
        if not self.matches(outcome):
            return RetryDecision.NOT_RETRIABLE
        if not body_replayable:
            return RetryDecision.UNSAFE
        if idempotent is None:
            idempotent = method.upper() in IDEMPOTENT_METHODS
        if not idempotent and outcome.failure not in _NOT_PROCESSED and not self._grpc_matches(outcome):
            return RetryDecision.UNSAFE
        if attempt > self.num_retries:
            return RetryDecision.RETRIES_EXHAUSTED
        return RetryDecision.RETRY

    def should_retry(self, attempt: int, outcome: Outcome, method: str, idempotent: bool | None = None,
                     body_replayable: bool = True) -> bool:
        """``decide`` as a yes or no."""
        return self.decide(attempt, outcome, method, idempotent, body_replayable) is RetryDecision.RETRY

    def attempt_deadline(self, now: float, request_deadline: float | None) -> float | None:
        """When the attempt starting at ``now`` times out: at its per-try
        timeout, but never after the route timeout's deadline, which (as in
        Envoy) covers all the attempts of a request together."""
        if self.per_try_timeout is None:
            return request_deadline
        per_try = now + self.per_try_timeout
        return per_try if request_deadline is None else min(per_try, request_deadline)


@dataclass(frozen=True)
class RetryBudget:
    """Envoy's CircuitBreakers.Thresholds.RetryBudget: concurrent retries are
    limited to ``budget_percent`` of the active plus pending requests, but
    never below ``min_retry_concurrency``. When set, it replaces max_retries."""

    budget_percent: float = 20.0
    min_retry_concurrency: int = 3

    def __post_init__(self) -> None:
        if not 0 <= self.budget_percent <= 100:
            raise ValueError(f"retry budget_percent must be within 0..100, got {self.budget_percent}")
        if self.min_retry_concurrency < 0:
            raise ValueError(f"retry budget min_retry_concurrency must not be negative, "
                             f"got {self.min_retry_concurrency}")

    def limit(self, active_requests: int, pending_requests: int = 0) -> int:
        """How many retries may be in flight now."""
        share = int(self.budget_percent / 100 * (active_requests + pending_requests))
        return max(share, self.min_retry_concurrency)
