"""Parsing Gateway API routes attached to Services (GAMMA) and our
TrafficPolicy from Kubernetes-style documents into controlplane.traffic
values. Problems raise ManifestError with what and where."""

from __future__ import annotations

import re
from typing import Any

from controlplane.errors import ManifestError
from controlplane.traffic import (
    BackendRef,
    CircuitBreaker,
    HeaderMatch,
    HttpRoute,
    LoadBalancer,
    OutlierDetection,
    ParentRef,
    RateLimit,
    Retry,
    RouteMatch,
    RouteRule,
    TrafficPolicy,
)

_DURATION = re.compile(r"^(?:\d{1,5}(?:h|ms|m|s)){1,4}$")
_PART = re.compile(r"(\d{1,5})(h|ms|m|s)")
_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
LB_POLICIES = ("RoundRobin", "LeastRequest", "Random", "RingHash")
GRPC_RETRY_CODES = ("cancelled", "deadline-exceeded", "internal", "resource-exhausted",
                    "unavailable")
RETRY_ON = ("5xx", "gateway-error", "reset", "connect-failure", "retriable-status-codes")


def duration(value: Any, what: str) -> float:
    """A Gateway API duration (GEP-2257): ``1h``, ``2s``, ``500ms``, ``1m30s``."""
    if not isinstance(value, str) or not _DURATION.match(value):
        raise ManifestError(f"{what} {value!r} is not a duration like 2s, 500ms or 1m30s")
    return sum(int(n) * _UNIT[u] for n, u in _PART.findall(value))


def _int(value: Any, what: str, low: int = 0, high: int = 2**31 - 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ManifestError(f"{what} {value!r} is not a whole number in [{low}, {high}]")
    return value


def _parents(doc: dict[str, Any], ns: str, what: str) -> tuple[ParentRef, ...]:
    out = []
    for p in (doc.get("spec") or {}).get("parentRefs") or []:
        if p.get("kind") != "Service" or p.get("group", "") not in ("", "core"):
            continue  # attached to a Gateway: not the mesh's to serve
        port = p.get("port")
        out.append(ParentRef(service=str(p.get("name")), namespace=str(p.get("namespace") or ns),
                             port=None if port is None else _int(port, f"{what} parentRef port", 1,
                                                                 65535)))
    return tuple(out)


def _backends(rule: dict[str, Any], ns: str, what: str) -> tuple[BackendRef, ...]:
    out = []
    for b in rule.get("backendRefs") or []:
        if b.get("kind", "Service") != "Service":
            raise ManifestError(f"{what}: backendRef kind {b.get('kind')} is not supported "
                                "(Service only)")
        port = b.get("port")
        out.append(BackendRef(service=str(b.get("name")), namespace=str(b.get("namespace") or ns),
                              port=None if port is None else _int(port, f"{what} backend port", 1,
                                                                  65535),
                              weight=_int(b.get("weight", 1), f"{what} backend weight", 0,
                                          1_000_000)))
    return tuple(out)


def _headers(items: Any, what: str) -> tuple[HeaderMatch, ...]:
    out = []
    for h in items or []:
        kind = h.get("type", "Exact")
        if kind not in ("Exact", "RegularExpression"):
            raise ManifestError(f"{what}: header match type {kind} is not supported")
        out.append(HeaderMatch(name=str(h["name"]).lower(), value=str(h.get("value", "")),
                               kind=kind))
    return tuple(out)


def _http_match(m: dict[str, Any], what: str) -> RouteMatch:
    path = m.get("path") or {}
    kind = path.get("type", "PathPrefix")
    if kind not in ("PathPrefix", "Exact", "RegularExpression"):
        raise ManifestError(f"{what}: path match type {kind} is not supported")
    value = str(path.get("value", "/"))
    if kind != "RegularExpression" and not value.startswith("/"):
        raise ManifestError(f"{what}: path {value!r} must start with /")
    if kind == "RegularExpression":
        try:
            re.compile(value)
        except re.error as exc:
            raise ManifestError(f"{what}: path regex {value!r}: {exc}") from None
    method = m.get("method")
    return RouteMatch(path_kind=kind, path=value, headers=_headers(m.get("headers"), what),
                      method=str(method).upper() if method else None)


def _grpc_match(m: dict[str, Any], what: str) -> RouteMatch:
    """A GRPCRoute method match is a match on the HTTP/2 path /<service>/<method>."""
    method = m.get("method") or {}
    service, name = method.get("service"), method.get("method")
    kind = method.get("type", "Exact")
    headers = _headers(m.get("headers"), what)
    if kind == "RegularExpression":
        regex = f"/{service or '[^/]+'}/{name or '[^/]+'}"
        return RouteMatch(path_kind="RegularExpression", path=regex, headers=headers)
    if service and name:
        return RouteMatch(path_kind="Exact", path=f"/{service}/{name}", headers=headers)
    if service:
        return RouteMatch(path_kind="PathPrefix", path=f"/{service}/", headers=headers)
    if name:
        return RouteMatch(path_kind="RegularExpression", path=f"/[^/]+/{re.escape(name)}",
                          headers=headers)
    return RouteMatch(headers=headers)


def _retry(rule: dict[str, Any], what: str) -> Retry | None:
    r = rule.get("retry")
    if not r:
        return None
    codes = tuple(_int(c, f"{what} retry code", 400, 599) for c in r.get("codes") or [])
    grpc = tuple(str(c) for c in r.get("grpcCodes") or [])
    for c in grpc:
        if c not in GRPC_RETRY_CODES:
            raise ManifestError(f"{what}: grpc retry code {c!r} is not one of {GRPC_RETRY_CODES}")
    # "retryOn", not "on": YAML 1.1 reads a bare `on` key as the boolean true.
    on = tuple(str(c) for c in r.get("retryOn") or [])
    for c in on:
        if c not in RETRY_ON:
            raise ManifestError(f"{what}: retry condition {c!r} is not one of {RETRY_ON}")
    per_try = duration(r["perTryTimeout"], f"{what} perTryTimeout") if r.get("perTryTimeout") else None
    return Retry(attempts=_int(r.get("attempts", 1), f"{what} retry attempts", 0, 10),
                 codes=codes, grpc_codes=grpc, on=on, per_try_timeout=per_try)


def parse_route(doc: dict[str, Any], ns: str, name: str) -> HttpRoute:
    kind = doc["kind"]
    what = f"{kind} {ns}/{name}"
    rules = []
    for i, rule in enumerate((doc.get("spec") or {}).get("rules") or []):
        rwhat = f"{what} rule {i}"
        raw = rule.get("matches") or [{}]
        matches = tuple(_grpc_match(m, rwhat) if kind == "GRPCRoute" else _http_match(m, rwhat)
                        for m in raw)
        timeouts = rule.get("timeouts") or {}
        timeout = duration(timeouts["request"], f"{rwhat} timeouts.request") \
            if timeouts.get("request") else None
        rules.append(RouteRule(matches=matches, backends=_backends(rule, ns, rwhat),
                               timeout=timeout, retry=_retry(rule, rwhat)))
    return HttpRoute(kind=kind, namespace=ns, name=name, parents=_parents(doc, ns, what),
                     rules=tuple(rules))


def parse_policy(doc: dict[str, Any], ns: str, name: str) -> TrafficPolicy:
    what = f"TrafficPolicy {ns}/{name}"
    spec = doc.get("spec") or {}
    target = spec.get("targetRef") or {}
    if target.get("kind") != "Service" or not target.get("name"):
        raise ManifestError(f"{what}: targetRef must name a Service")
    lb = cb = od = rl = None
    if "loadBalancer" in spec:
        s = spec["loadBalancer"] or {}
        policy = s.get("type", "RoundRobin")
        if policy not in LB_POLICIES:
            raise ManifestError(f"{what}: loadBalancer.type {policy!r} is not one of {LB_POLICIES}")
        h = s.get("hashOn") or {}
        lb = LoadBalancer(policy=policy, choice_count=_int(s.get("choiceCount", 2),
                                                           f"{what} choiceCount", 2, 100),
                          minimum_ring_size=_int(s.get("minimumRingSize", 1024),
                                                 f"{what} minimumRingSize", 1, 8_388_608),
                          hash_header=str(h["header"]).lower() if h.get("header") else None,
                          hash_cookie=str(h["cookie"]) if h.get("cookie") else None,
                          hash_source_ip=bool(h.get("sourceIP", False)))
    if "circuitBreaker" in spec:
        s = spec["circuitBreaker"] or {}
        d = CircuitBreaker()
        budget = s.get("retryBudget") or {}
        cb = CircuitBreaker(
            max_connections=_int(s.get("maxConnections", d.max_connections), f"{what} maxConnections"),
            max_pending_requests=_int(s.get("maxPendingRequests", d.max_pending_requests),
                                      f"{what} maxPendingRequests"),
            max_requests=_int(s.get("maxRequests", d.max_requests), f"{what} maxRequests"),
            max_retries=_int(s.get("maxRetries", d.max_retries), f"{what} maxRetries"),
            retry_budget_percent=float(budget["percent"]) if "percent" in budget else None,
            min_retry_concurrency=_int(budget["minRetryConcurrency"], f"{what} minRetryConcurrency")
            if "minRetryConcurrency" in budget else None)
    if "outlierDetection" in spec:
        s = spec["outlierDetection"] or {}
        d2 = OutlierDetection()
        od = OutlierDetection(
            consecutive_5xx=_int(s.get("consecutive5xxErrors", d2.consecutive_5xx),
                                 f"{what} consecutive5xxErrors"),
            consecutive_gateway_errors=_int(s["consecutiveGatewayErrors"],
                                            f"{what} consecutiveGatewayErrors")
            if "consecutiveGatewayErrors" in s else None,
            interval=duration(s["interval"], f"{what} interval") if "interval" in s
            else d2.interval,
            base_ejection_time=duration(s["baseEjectionTime"], f"{what} baseEjectionTime")
            if "baseEjectionTime" in s else d2.base_ejection_time,
            max_ejection_time=duration(s["maxEjectionTime"], f"{what} maxEjectionTime")
            if "maxEjectionTime" in s else d2.max_ejection_time,
            max_ejection_percent=_int(s.get("maxEjectionPercent", d2.max_ejection_percent),
                                      f"{what} maxEjectionPercent", 0, 100))
    if "rateLimit" in spec:
        s = spec["rateLimit"] or {}
        if "requestsPerSecond" in s:
            rps = _int(s["requestsPerSecond"], f"{what} requestsPerSecond", 1)
            rl = RateLimit(max_tokens=rps, tokens_per_fill=rps, fill_interval=1.0)
        else:
            tb = s.get("tokenBucket") or {}
            rl = RateLimit(max_tokens=_int(tb.get("maxTokens"), f"{what} maxTokens", 1),
                           tokens_per_fill=_int(tb.get("tokensPerFill", 1), f"{what} tokensPerFill", 1),
                           fill_interval=duration(tb.get("fillInterval", "1s"), f"{what} fillInterval"))
    return TrafficPolicy(namespace=ns, name=name, service=str(target["name"]), load_balancer=lb,
                         circuit_breaker=cb, outlier_detection=od, rate_limit=rl)
