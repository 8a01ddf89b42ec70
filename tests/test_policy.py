"""Resilience primitives against Envoy's documented behaviour: circuit breakers,
outlier ejection, retry conditions and safety, retry budget, token bucket."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dataplane.backend import Backend
from dataplane.policy.circuit_breaker import CircuitBreaker, CircuitBreakerConfig, Resource
from dataplane.policy.outlier import Detector, LocalOrigin, OutlierConfig, OutlierDetector
from dataplane.policy.ratelimit import TokenBucket, TokenBucketConfig
from dataplane.policy.retry import (
    Failure,
    Outcome,
    RetryBackOff,
    RetryBudget,
    RetryDecision,
    RetryOn,
    RetryPolicy,
    parse_retry_on,
)

HOSTS = tuple(Backend(f"10.0.1.{i}", 8080) for i in range(1, 21))
TEN = HOSTS[:10]  # at Envoy's default 10%, ten hosts is the smallest cluster that ejects one


def fail(detector: OutlierDetector, backend: Backend, now: float, times: int = 5, status: int = 500) -> None:
    for _ in range(times):
        detector.record(backend, status, now)


# --- circuit breaker -----------------------------------------------------------------------------


def test_circuit_breaker_defaults_are_envoys() -> None:
    cfg = CircuitBreakerConfig()
    assert (cfg.max_connections, cfg.max_pending_requests, cfg.max_requests, cfg.max_retries) == (
        1024, 1024, 1024, 3)
    assert cfg.retry_budget is None


def test_circuit_breaker_rejects_request_n_plus_one_and_releases() -> None:
    breaker = CircuitBreaker(CircuitBreakerConfig(max_requests=3))
    assert all(breaker.try_acquire(Resource.REQUESTS) for _ in range(3))
    assert breaker.is_open(Resource.REQUESTS)
    assert not breaker.try_acquire(Resource.REQUESTS)  # request 4: 503 with flag UO
    assert breaker.overflows(Resource.REQUESTS) == 1
    breaker.release(Resource.REQUESTS)
    assert breaker.remaining(Resource.REQUESTS) == 1
    assert breaker.try_acquire(Resource.REQUESTS)
    assert breaker.active(Resource.REQUESTS) == 3


def test_circuit_breaker_limits_are_independent_per_resource() -> None:
    breaker = CircuitBreaker(CircuitBreakerConfig(max_pending_requests=1, max_connections=2))
    assert breaker.try_acquire(Resource.PENDING_REQUESTS)
    assert not breaker.try_acquire(Resource.PENDING_REQUESTS)
    assert breaker.try_acquire(Resource.CONNECTIONS) and breaker.try_acquire(Resource.CONNECTIONS)
    assert not breaker.try_acquire(Resource.CONNECTIONS)
    assert breaker.try_acquire(Resource.REQUESTS)
    assert breaker.overflows(Resource.PENDING_REQUESTS) == breaker.overflows(Resource.CONNECTIONS) == 1
    assert breaker.overflows(Resource.REQUESTS) == 0


def test_circuit_breaker_allows_three_concurrent_retries_by_default() -> None:
    breaker = CircuitBreaker()
    assert [breaker.try_acquire(Resource.RETRIES) for _ in range(4)] == [True, True, True, False]


def test_circuit_breaker_release_without_acquire_is_a_caller_bug() -> None:
    with pytest.raises(ValueError, match="without a matching try_acquire"):
        CircuitBreaker().release(Resource.RETRIES)


def test_circuit_breaker_rejects_negative_limits() -> None:
    with pytest.raises(ValueError, match="max_requests must not be negative"):
        CircuitBreakerConfig(max_requests=-1)


# --- retry budget --------------------------------------------------------------------------------


def test_retry_budget_defaults_and_floor() -> None:
    budget = RetryBudget()
    assert (budget.budget_percent, budget.min_retry_concurrency) == (20.0, 3)
    assert budget.limit(0) == 3  # never below min_retry_concurrency
    assert budget.limit(10) == 3
    assert budget.limit(100) == 20
    assert budget.limit(80, 20) == 20  # pending requests count too
    assert RetryBudget(budget_percent=25).limit(100) == 25  # Envoy's documented example


def test_retry_budget_replaces_max_retries_and_limits_concurrent_retries() -> None:
    breaker = CircuitBreaker(CircuitBreakerConfig(max_retries=1000, retry_budget=RetryBudget()))
    for _ in range(50):
        assert breaker.try_acquire(Resource.REQUESTS)
    granted = sum(breaker.try_acquire(Resource.RETRIES) for _ in range(20))
    assert granted == 10  # 20% of 50 active requests
    assert breaker.overflows(Resource.RETRIES) == 10
    for _ in range(50):
        assert breaker.try_acquire(Resource.REQUESTS)
    assert breaker.remaining(Resource.RETRIES) == 10  # the budget grew with the load
    breaker.release(Resource.RETRIES)
    assert breaker.active(Resource.RETRIES) == 9


# --- outlier detection ---------------------------------------------------------------------------


def test_outlier_defaults_are_envoys() -> None:
    cfg = OutlierConfig()
    assert (cfg.consecutive_5xx, cfg.consecutive_gateway_failure) == (5, 5)
    assert (cfg.enforcing_consecutive_5xx, cfg.enforcing_consecutive_gateway_failure) == (100, 0)
    assert (cfg.interval, cfg.base_ejection_time, cfg.effective_max_ejection_time) == (10.0, 30.0, 300.0)
    assert (cfg.max_ejection_percent, cfg.always_eject_one_host) == (10, False)
    assert OutlierConfig(base_ejection_time=400).effective_max_ejection_time == 400


def test_five_consecutive_5xx_eject_for_30s_then_readmit() -> None:
    od = OutlierDetector(TEN)
    bad = TEN[0]
    fail(od, bad, 100.0, times=4)
    assert not od.is_ejected(bad, 100.0)
    ejection = od.record(bad, 500, 100.0)
    assert ejection is not None and ejection.detector is Detector.CONSECUTIVE_5XX
    assert (ejection.at, ejection.until) == (100.0, 130.0)
    assert od.is_ejected(bad, 129.9)
    assert od.ejected(129.9) == {bad}
    assert not od.is_ejected(bad, 130.0)
    assert od.ejected(130.0) == frozenset()
    assert od.stats["ejections_enforced_consecutive_5xx"] == 1


def test_second_ejection_lasts_twice_as_long() -> None:
    od = OutlierDetector(TEN)
    bad = TEN[0]
    fail(od, bad, 0.0)
    assert not od.is_ejected(bad, 30.0)
    fail(od, bad, 31.0)  # fails again right after readmission
    assert od.is_ejected(bad, 90.9)
    assert not od.is_ejected(bad, 91.0)  # 31 + 2 x 30
    assert od.ejections(bad) == 2


def test_ejection_time_grows_to_max_ejection_time_and_stops() -> None:
    od = OutlierDetector(TEN)
    bad = TEN[0]
    now, durations = 0.0, []
    for _ in range(13):
        fail(od, bad, now)
        ejection = od.ejected(now)
        assert ejection == {bad}
        start = now
        while od.is_ejected(bad, now):
            now += 1.0
        durations.append(now - start)
    assert durations[:10] == [30, 60, 90, 120, 150, 180, 210, 240, 270, 300]
    assert durations[10:] == [300, 300, 300]


def test_ejection_time_decays_back_to_base_while_healthy() -> None:
    od = OutlierDetector(TEN)
    bad = TEN[0]
    fail(od, bad, 0.0)
    fail(od, bad, 30.0)  # second ejection: 60 s, until 90
    assert not od.is_ejected(bad, 90.0)
    # Healthy for 2 intervals: the multiplier drops from 2 to 0, so the next is 30 s again.
    fail(od, bad, 110.0)
    assert od.is_ejected(bad, 139.0) and not od.is_ejected(bad, 140.0)


def test_a_success_resets_the_consecutive_count() -> None:
    od = OutlierDetector(TEN)
    bad = TEN[0]
    fail(od, bad, 0.0, times=4)
    od.record(bad, 200, 0.0)
    fail(od, bad, 0.0, times=4)
    assert not od.is_ejected(bad, 0.0)
    od.record(bad, 404, 0.0)  # a 4xx is the client's fault, not the host's
    fail(od, bad, 0.0, times=4)
    assert not od.is_ejected(bad, 0.0)


def test_local_origin_failures_count_as_5xx() -> None:
    od = OutlierDetector(TEN)
    bad = TEN[0]
    for result in [LocalOrigin.CONNECT_FAILED, LocalOrigin.TIMEOUT, LocalOrigin.RESET,
                   LocalOrigin.CONNECT_FAILED]:
        od.record(bad, result, 0.0)
    od.record(bad, LocalOrigin.CONNECT_SUCCESS, 0.0)  # an L4 success resets
    for _ in range(5):
        od.record(bad, LocalOrigin.CONNECT_FAILED, 1.0)
    assert od.is_ejected(bad, 1.0)


def test_gateway_failures_are_detected_but_not_enforced_by_default() -> None:
    # consecutive_5xx high so only the gateway detector can fire.
    od = OutlierDetector(TEN, OutlierConfig(consecutive_5xx=100))
    bad = TEN[0]
    fail(od, bad, 0.0, status=503)
    assert not od.is_ejected(bad, 0.0)
    assert od.stats["ejections_detected_consecutive_gateway_failure"] == 1
    assert od.stats["ejections_enforced_consecutive_gateway_failure"] == 0


def test_gateway_failures_eject_when_enforced_and_other_5xx_break_the_run() -> None:
    od = OutlierDetector(TEN, OutlierConfig(consecutive_5xx=100, enforcing_consecutive_gateway_failure=100))
    bad = TEN[0]
    for status in (502, 503, 504, 500, 503, 502, 504, 503):  # the 500 restarts the gateway count
        od.record(bad, status, 0.0)
    assert not od.is_ejected(bad, 0.0)
    ejection = od.record(bad, 504, 0.0)
    assert ejection is not None and ejection.detector is Detector.CONSECUTIVE_GATEWAY_FAILURE


def test_max_ejection_percent_caps_ejections() -> None:
    od = OutlierDetector(TEN)  # 10% of 10 hosts: one
    fail(od, TEN[0], 0.0)
    fail(od, TEN[1], 0.0)
    assert od.ejected(0.0) == {TEN[0]}
    assert od.stats["ejections_overflow"] == 1
    # Once the first is readmitted, the next run of failures can eject another.
    fail(od, TEN[1], 30.0)
    assert od.ejected(30.0) == {TEN[1]}


def test_default_percent_ejects_nothing_in_a_small_cluster_as_envoy_does() -> None:
    three = HOSTS[:3]
    od = OutlierDetector(three)
    fail(od, three[0], 0.0)
    assert od.ejected(0.0) == frozenset()
    assert od.stats["ejections_overflow"] == 1


def test_always_eject_one_host_lets_a_small_cluster_eject_one() -> None:
    three = HOSTS[:3]
    od = OutlierDetector(three, OutlierConfig(always_eject_one_host=True))
    fail(od, three[0], 0.0)
    fail(od, three[1], 0.0)
    assert od.ejected(0.0) == {three[0]}


def test_max_ejection_percent_scales_with_cluster_size() -> None:
    od = OutlierDetector(HOSTS[:4], OutlierConfig(max_ejection_percent=50))
    for host in HOSTS[:4]:
        fail(od, host, 0.0)
    assert od.ejected(0.0) == {HOSTS[0], HOSTS[1]}


def test_enforcement_percentage_uses_the_injected_rng() -> None:
    cfg = OutlierConfig(enforcing_consecutive_5xx=50, max_ejection_percent=100)
    od = OutlierDetector(HOSTS, cfg, rng=random.Random(3))
    for host in HOSTS:
        fail(od, host, 0.0)
    assert 5 <= len(od.ejected(0.0)) <= 15
    again = OutlierDetector(HOSTS, cfg, rng=random.Random(3))
    for host in HOSTS:
        fail(again, host, 0.0)
    assert again.ejected(0.0) == od.ejected(0.0)


def test_jitter_extends_ejection_within_bound() -> None:
    od = OutlierDetector(TEN, OutlierConfig(max_ejection_time_jitter=5.0), rng=random.Random(8))
    fail(od, TEN[0], 0.0)
    ejection = od.record(TEN[1], 200, 0.0)
    assert ejection is None
    assert od.is_ejected(TEN[0], 30.0 - 1e-9)
    assert not od.is_ejected(TEN[0], 35.0)


def test_hosts_not_in_the_cluster_are_ignored_and_removed_hosts_forgotten() -> None:
    od = OutlierDetector(TEN)
    stranger = HOSTS[15]
    fail(od, stranger, 0.0)
    assert od.ejected(0.0) == frozenset()
    fail(od, TEN[0], 0.0)
    od.set_hosts(TEN[1:])
    assert od.ejected(0.0) == frozenset()
    assert od.ejections_active == 0


def test_outlier_config_is_validated_like_envoy() -> None:
    with pytest.raises(ValueError, match="max_ejection_time .* cannot be smaller than base_ejection_time"):
        OutlierConfig(base_ejection_time=60, max_ejection_time=30)
    with pytest.raises(ValueError, match="max_ejection_percent is a percentage"):
        OutlierConfig(max_ejection_percent=101)


# --- retries -------------------------------------------------------------------------------------


def test_retry_policy_defaults_retry_nothing_and_once_when_configured() -> None:
    assert not RetryPolicy().should_retry(1, Outcome.response(503), "GET")
    policy = RetryPolicy.from_envoy("5xx")
    assert policy.num_retries == 1
    assert policy.decide(1, Outcome.response(503), "GET") is RetryDecision.RETRY
    assert policy.decide(2, Outcome.response(503), "GET") is RetryDecision.RETRIES_EXHAUSTED


def test_parse_retry_on_reads_envoys_comma_list_and_rejects_unknown() -> None:
    assert parse_retry_on("5xx, reset,unavailable") == {RetryOn.FIVE_XX, RetryOn.RESET, RetryOn.UNAVAILABLE}
    with pytest.raises(ValueError, match="'5XX' is not a supported retry condition"):
        parse_retry_on("5XX")


@pytest.mark.parametrize("retry_on,status,retried", [
    ("5xx", 500, True), ("5xx", 503, True), ("5xx", 404, False), ("5xx", 200, False),
    ("gateway-error", 502, True), ("gateway-error", 504, True), ("gateway-error", 500, False),
    ("retriable-4xx", 409, True), ("retriable-4xx", 429, False),
    ("connect-failure", 503, False), ("reset", 503, False),
])
def test_retry_on_status_conditions(retry_on: str, status: int, retried: bool) -> None:
    policy = RetryPolicy.from_envoy(retry_on, num_retries=2)
    assert policy.should_retry(1, Outcome.response(status), "GET") is retried


def test_retriable_status_codes_need_their_condition() -> None:
    with_condition = RetryPolicy.from_envoy("retriable-status-codes", retriable_status_codes=frozenset({429}))
    assert with_condition.should_retry(1, Outcome.response(429), "GET")
    assert not with_condition.should_retry(1, Outcome.response(503), "GET")
    without = RetryPolicy.from_envoy("5xx", retriable_status_codes=frozenset({429}))
    assert not without.should_retry(1, Outcome.response(429), "GET")


@pytest.mark.parametrize("retry_on,failure,retried", [
    ("connect-failure", Failure.CONNECT_FAILURE, True),
    ("connect-failure", Failure.RESET, False),
    ("connect-failure", Failure.PER_TRY_TIMEOUT, False),
    ("reset", Failure.RESET, True),
    ("reset", Failure.PER_TRY_TIMEOUT, True),
    ("reset", Failure.CONNECT_FAILURE, True),
    ("reset-before-request", Failure.RESET_BEFORE_REQUEST, True),
    ("reset-before-request", Failure.CONNECT_FAILURE, True),
    ("reset-before-request", Failure.RESET, False),
    ("refused-stream", Failure.REFUSED_STREAM, True),
    ("refused-stream", Failure.RESET, False),
    ("5xx", Failure.RESET, True),  # a reset is a would-be 503, as Envoy counts it
    ("5xx", Failure.PER_TRY_TIMEOUT, True),
    ("gateway-error", Failure.CONNECT_FAILURE, True),
    ("5xx,reset,connect-failure", Failure.OVERFLOW, False),  # our own breaker's 503 is final
])
def test_retry_on_failure_conditions(retry_on: str, failure: Failure, retried: bool) -> None:
    assert RetryPolicy.from_envoy(retry_on).should_retry(1, Outcome.failed(failure), "GET") is retried


@pytest.mark.parametrize("retry_on,grpc_status,retried", [
    ("unavailable", 14, True), ("cancelled", 1, True), ("deadline-exceeded", 4, True),
    ("internal", 13, True), ("resource-exhausted", 8, True),
    ("unavailable", 13, False), ("unavailable", 0, False), ("5xx", 14, False),
])
def test_retry_on_grpc_status_in_headers(retry_on: str, grpc_status: int, retried: bool) -> None:
    policy = RetryPolicy.from_envoy(retry_on)
    # gRPC errors come as HTTP 200 with grpc-status in a trailers-only response.
    assert policy.should_retry(1, Outcome.response(200, grpc_status=grpc_status), "POST") is retried


def test_non_idempotent_requests_are_retried_only_when_never_processed() -> None:
    policy = RetryPolicy.from_envoy("5xx,reset,connect-failure,refused-stream,reset-before-request")
    assert policy.decide(1, Outcome.response(503), "POST") is RetryDecision.UNSAFE
    assert policy.decide(1, Outcome.failed(Failure.RESET), "PATCH") is RetryDecision.UNSAFE
    assert policy.decide(1, Outcome.failed(Failure.PER_TRY_TIMEOUT), "POST") is RetryDecision.UNSAFE
    for never_processed in (Failure.CONNECT_FAILURE, Failure.RESET_BEFORE_REQUEST, Failure.REFUSED_STREAM):
        assert policy.decide(1, Outcome.failed(never_processed), "POST") is RetryDecision.RETRY
    # Idempotent methods, or a caller vouching for the request, retry on anything covered.
    assert policy.decide(1, Outcome.response(503), "put") is RetryDecision.RETRY
    assert policy.decide(1, Outcome.response(503), "POST", idempotent=True) is RetryDecision.RETRY


def test_a_streamed_body_that_was_not_kept_forbids_retry() -> None:
    policy = RetryPolicy.from_envoy("5xx,connect-failure")
    outcome = Outcome.failed(Failure.CONNECT_FAILURE)
    assert policy.decide(1, outcome, "PUT", body_replayable=False) is RetryDecision.UNSAFE
    assert policy.decide(1, outcome, "PUT") is RetryDecision.RETRY


def test_unsafe_and_not_retriable_come_before_exhausted() -> None:
    policy = RetryPolicy.from_envoy("5xx", num_retries=0)
    assert policy.decide(1, Outcome.response(200), "GET") is RetryDecision.NOT_RETRIABLE
    assert policy.decide(1, Outcome.response(503), "POST") is RetryDecision.UNSAFE
    assert policy.decide(1, Outcome.response(503), "GET") is RetryDecision.RETRIES_EXHAUSTED


def test_num_retries_bounds_the_attempts() -> None:
    policy = RetryPolicy.from_envoy("gateway-error", num_retries=3)
    decisions = [policy.decide(attempt, Outcome.response(503), "GET") for attempt in (1, 2, 3, 4)]
    assert decisions == [RetryDecision.RETRY] * 3 + [RetryDecision.RETRIES_EXHAUSTED]


def test_outcome_is_a_response_or_a_failure() -> None:
    with pytest.raises(ValueError, match="either a response status or a failure"):
        Outcome()
    with pytest.raises(ValueError, match="either a response status or a failure"):
        Outcome(status=503, failure=Failure.RESET)


def test_per_try_timeout_is_bounded_by_the_route_deadline() -> None:
    policy = RetryPolicy.from_envoy("5xx", per_try_timeout=0.5)
    assert policy.attempt_deadline(10.0, None) == 10.5
    assert policy.attempt_deadline(10.0, 11.0) == 10.5
    assert policy.attempt_deadline(10.8, 11.0) == 11.0
    assert RetryPolicy.from_envoy("5xx").attempt_deadline(10.0, 13.0) == 13.0


def test_back_off_is_full_jitter_exponential_capped_at_ten_times_base() -> None:
    back_off = RetryBackOff()
    rng = random.Random(1)
    for retry, upper in [(1, 0.025), (2, 0.075), (3, 0.175), (4, 0.25), (10, 0.25)]:
        delays = [back_off.delay(retry, rng) for _ in range(500)]
        assert all(0 <= d < upper for d in delays)
        assert max(delays) > upper * 0.9
    with pytest.raises(ValueError, match="max_interval .* must be at least base_interval"):
        RetryBackOff(base_interval=0.1, max_interval=0.05)


def test_retry_then_budget_flow_as_the_router_runs_it() -> None:
    # A 503 on a GET with retry_on 5xx: the policy says retry, the breaker grants
    # the retry while under max_retries and refuses beyond it (retry overflow).
    policy = RetryPolicy.from_envoy("5xx")
    breaker = CircuitBreaker(CircuitBreakerConfig(max_retries=2))
    granted = [policy.should_retry(1, Outcome.response(503), "GET") and breaker.try_acquire(Resource.RETRIES)
               for _ in range(3)]
    assert granted == [True, True, False]
    assert breaker.overflows(Resource.RETRIES) == 1


# --- token bucket --------------------------------------------------------------------------------


def test_token_bucket_allows_r_per_interval_then_refuses_and_refills() -> None:
    bucket = TokenBucket(TokenBucketConfig(max_tokens=5, tokens_per_fill=5, fill_interval=1.0), now=0.0)
    assert [bucket.allow(0.0) for _ in range(6)] == [True] * 5 + [False]
    assert not bucket.allow(0.1)  # half a token is not a token
    assert [bucket.allow(1.0) for _ in range(6)] == [True] * 5 + [False]
    assert [bucket.allow(1.4) for _ in range(3)] == [True, True, False]  # refills continuously


def test_token_bucket_starts_full_and_never_holds_more_than_max_tokens() -> None:
    bucket = TokenBucket(TokenBucketConfig(max_tokens=3, fill_interval=0.1), now=0.0)
    assert bucket.tokens(0.0) == 3
    assert bucket.tokens(1000.0) == 3
    assert TokenBucketConfig(max_tokens=3, fill_interval=0.1).tokens_per_fill == 1


def test_token_bucket_refills_exact_tokens_despite_float_time() -> None:
    bucket = TokenBucket(TokenBucketConfig(max_tokens=1, fill_interval=0.1), now=0.0)
    assert bucket.allow(0.0)
    for step in range(1, 31):
        assert bucket.allow(step * 0.1), step
        assert not bucket.allow(step * 0.1)


def test_token_bucket_ignores_a_clock_stepping_back() -> None:
    bucket = TokenBucket(TokenBucketConfig(max_tokens=1, fill_interval=1.0), now=10.0)
    assert bucket.allow(10.0)
    assert not bucket.allow(5.0)
    assert bucket.allow(11.0)


def test_token_bucket_config_is_validated() -> None:
    with pytest.raises(ValueError, match="fill_interval must be positive"):
        TokenBucketConfig(max_tokens=1, fill_interval=0)
    with pytest.raises(ValueError, match="max_tokens must be positive"):
        TokenBucketConfig(max_tokens=0, fill_interval=1)


@given(max_tokens=st.integers(min_value=1, max_value=50), per_fill=st.integers(min_value=1, max_value=20),
       interval=st.floats(min_value=0.05, max_value=10), steps=st.lists(
           st.tuples(st.floats(min_value=0, max_value=2), st.integers(min_value=0, max_value=30)),
           max_size=40))
def test_token_bucket_never_exceeds_max_nor_its_rate(max_tokens: int, per_fill: int, interval: float,
                                                    steps: list[tuple[float, int]]) -> None:
    cfg = TokenBucketConfig(max_tokens=max_tokens, tokens_per_fill=per_fill, fill_interval=interval)
    bucket = TokenBucket(cfg, now=0.0)
    now, allowed = 0.0, 0
    for advance, requests in steps:
        now += advance
        assert 0 <= bucket.tokens(now) <= max_tokens
        allowed += sum(bucket.allow(now) for _ in range(requests))
        # Over [0, now] at most the initial bucket plus what refilled passes.
        assert allowed <= max_tokens + cfg.rate * now + 1e-6


@given(results=st.lists(st.sampled_from([200, 404, 500, 502, 503, 504]), max_size=200),
       hosts=st.integers(min_value=1, max_value=20), percent=st.integers(min_value=0, max_value=100))
def test_ejections_never_exceed_max_ejection_percent(results: list[int], hosts: int, percent: int) -> None:
    cluster = HOSTS[:hosts]
    od = OutlierDetector(cluster, OutlierConfig(max_ejection_percent=percent))
    for i, status in enumerate(results):
        od.record(cluster[i % hosts], status, float(i))
        assert len(od.ejected(float(i))) * 100 <= percent * hosts
