"""The user's traffic intent, as immutable values: Gateway API routes attached
to a Service (the GAMMA convention) and our TrafficPolicy. Translation to
Envoy fields lives in translate.py; parsing in gateway_api.py."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HeaderMatch:
    name: str  # lower case
    value: str
    kind: str = "Exact"  # Exact | RegularExpression


@dataclass(frozen=True)
class RouteMatch:
    path_kind: str = "PathPrefix"  # PathPrefix | Exact | RegularExpression
    path: str = "/"
    headers: tuple[HeaderMatch, ...] = ()
    method: str | None = None


@dataclass(frozen=True)
class BackendRef:
    service: str
    namespace: str
    port: int | None
    weight: int = 1


@dataclass(frozen=True)
class Retry:
    attempts: int = 1
    codes: tuple[int, ...] = ()  # HTTP statuses that are retried
    grpc_codes: tuple[str, ...] = ()  # e.g. "unavailable", "resource-exhausted"
    on: tuple[str, ...] = ()  # extra Envoy retry_on conditions: reset, connect-failure, 5xx
    per_try_timeout: float | None = None


@dataclass(frozen=True)
class RouteRule:
    matches: tuple[RouteMatch, ...]
    backends: tuple[BackendRef, ...]
    timeout: float | None = None
    retry: Retry | None = None


@dataclass(frozen=True)
class ParentRef:
    service: str
    namespace: str
    port: int | None  # None: every port of the service


@dataclass(frozen=True)
class HttpRoute:
    """An HTTPRoute or GRPCRoute whose parents are Services."""

    kind: str  # HTTPRoute | GRPCRoute
    namespace: str
    name: str
    parents: tuple[ParentRef, ...]
    rules: tuple[RouteRule, ...]

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.namespace}/{self.name}"


@dataclass(frozen=True)
class LoadBalancer:
    policy: str = "RoundRobin"  # RoundRobin | LeastRequest | Random | RingHash
    choice_count: int = 2
    minimum_ring_size: int = 1024
    hash_header: str | None = None
    hash_cookie: str | None = None
    hash_source_ip: bool = False


@dataclass(frozen=True)
class CircuitBreaker:
    max_connections: int = 1024
    max_pending_requests: int = 1024
    max_requests: int = 1024
    max_retries: int = 3
    retry_budget_percent: float | None = None
    min_retry_concurrency: int | None = None


@dataclass(frozen=True)
class OutlierDetection:
    consecutive_5xx: int = 5
    consecutive_gateway_errors: int | None = None
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_time: float = 300.0
    max_ejection_percent: int = 10


@dataclass(frozen=True)
class RateLimit:
    max_tokens: int
    tokens_per_fill: int
    fill_interval: float


@dataclass(frozen=True)
class TrafficPolicy:
    """nodemesh.io/v1alpha1 TrafficPolicy, attached to one Service."""

    namespace: str
    name: str
    service: str
    load_balancer: LoadBalancer | None = None
    circuit_breaker: CircuitBreaker | None = None
    outlier_detection: OutlierDetection | None = None
    rate_limit: RateLimit | None = None

    @property
    def service_key(self) -> str:
        return f"{self.namespace}/{self.service}"
