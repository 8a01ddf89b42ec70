"""User-facing traffic config (Gateway API routes on Services, TrafficPolicy)
to Envoy v3 fields: what an operator writes is what the proxies get."""

from __future__ import annotations

from pathlib import Path

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2

from controlplane import naming
from controlplane.errors import ManifestError
from controlplane.gateway_api import duration
from controlplane.translate import LOCAL_RATELIMIT, translate
from controlplane.yaml_source import YamlDirectorySource, parse_file

SERVICES = """
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 198.19.0.10, ports: [{name: http, port: 80, targetPort: 8080}]}
---
kind: Service
metadata: {name: web-v1, namespace: shop}
spec: {clusterIP: None, ports: [{name: http, port: 80, targetPort: 8080}]}
---
kind: Service
metadata: {name: web-v2, namespace: shop}
spec: {clusterIP: None, ports: [{name: http, port: 80, targetPort: 8080}]}
---
kind: Service
metadata: {name: greeter, namespace: shop}
spec: {clusterIP: 198.19.0.30, ports: [{name: grpc, port: 50051}]}
"""
ROUTES = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web-canary, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /}}]
    backendRefs: [{name: web-v1, port: 80, weight: 90}, {name: web-v2, port: 80, weight: 10}]
    timeouts: {request: 1500ms}
    retry: {attempts: 2, codes: [503], retryOn: [reset, connect-failure], perTryTimeout: 500ms}
  - matches: [{path: {type: Exact, value: /admin}, method: POST,
               headers: [{name: X-Canary, value: "1"}]}]
    backendRefs: [{name: web-v2, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: greeter, namespace: shop}
spec:
  parentRefs: [{kind: Service, name: greeter}]
  rules:
  - matches: [{method: {service: helloworld.Greeter, method: SayHello}}]
    backendRefs: [{name: greeter, port: 50051}]
    retry: {attempts: 3, grpcCodes: [unavailable]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: for-a-gateway, namespace: shop}
spec:
  parentRefs: [{kind: Gateway, name: ingress}]
  rules: [{backendRefs: [{name: web-v1, port: 80}]}]
"""
POLICY = """
apiVersion: nodemesh.io/v1alpha1
kind: TrafficPolicy
metadata: {name: web, namespace: shop}
spec:
  targetRef: {kind: Service, name: web}
  loadBalancer: {type: RingHash, minimumRingSize: 2048, hashOn: {header: X-User}}
  circuitBreaker: {maxConnections: 10, maxPendingRequests: 5, maxRequests: 20, maxRetries: 2,
                   retryBudget: {percent: 25, minRetryConcurrency: 4}}
  outlierDetection: {consecutive5xxErrors: 3, consecutiveGatewayErrors: 2, interval: 2s,
                     baseEjectionTime: 5s, maxEjectionTime: 1m, maxEjectionPercent: 50}
  rateLimit: {requestsPerSecond: 20}
"""


def snapshot(tmp_path: Path, *texts: str):  # type: ignore[no-untyped-def]
    for i, t in enumerate(texts):
        (tmp_path / f"{i}.yaml").write_text(t)
    src = YamlDirectorySource(tmp_path)
    src.poll()
    assert src.problems == (), src.problems
    return translate(src.registry)


def web_routes(snap):  # type: ignore[no-untyped-def]
    rc = snap.of(naming.ROUTE)["web.shop.svc.cluster.local:80"].message
    return rc.virtual_hosts[0]


def test_durations() -> None:
    assert duration("1500ms", "x") == 1.5
    assert duration("1m30s", "x") == 90
    with pytest.raises(ManifestError):
        duration("1.5s", "x")


def test_httproute_split_timeout_retry_and_precedence(tmp_path: Path) -> None:
    vh = web_routes(snapshot(tmp_path, SERVICES, ROUTES))
    names = [r.name for r in vh.routes]
    # Exact path before prefix, whatever the order in the manifest.
    assert names == ["HTTPRoute/shop/web-canary/rule-1", "HTTPRoute/shop/web-canary/rule-0"]
    exact, split = vh.routes
    assert exact.match.path == "/admin"
    assert {(h.name, h.string_match.exact) for h in exact.match.headers} == {
        ("x-canary", "1"), (":method", "POST")}
    assert exact.route.cluster == "outbound|80||web-v2.shop.svc.cluster.local"
    wc = {c.name: c.weight.value for c in split.route.weighted_clusters.clusters}
    assert wc == {"outbound|80||web-v1.shop.svc.cluster.local": 90,
                  "outbound|80||web-v2.shop.svc.cluster.local": 10}
    assert split.route.timeout.ToMilliseconds() == 1500
    rp = split.route.retry_policy
    assert rp.num_retries.value == 2 and list(rp.retriable_status_codes) == [503]
    assert set(rp.retry_on.split(",")) == {"reset", "connect-failure", "retriable-status-codes"}
    assert rp.per_try_timeout.ToMilliseconds() == 500


def test_grpcroute_matches_the_method_path(tmp_path: Path) -> None:
    snap = snapshot(tmp_path, SERVICES, ROUTES)
    vh = snap.of(naming.ROUTE)["greeter.shop.svc.cluster.local:50051"].message.virtual_hosts[0]
    (r,) = vh.routes
    assert r.match.path == "/helloworld.Greeter/SayHello"
    assert r.route.retry_policy.retry_on == "unavailable"
    assert r.route.retry_policy.num_retries.value == 3


def test_routes_for_gateways_are_ignored_and_unrouted_services_get_a_default(tmp_path: Path) -> None:
    snap = snapshot(tmp_path, SERVICES, ROUTES)
    names = [r.name for r in snap.of(naming.ROUTE)
             ["web-v1.shop.svc.cluster.local:80"].message.virtual_hosts[0].routes]
    assert names == ["default"]


def test_traffic_policy_maps_onto_cluster_and_route_fields(tmp_path: Path) -> None:
    snap = snapshot(tmp_path, SERVICES, POLICY)
    c = snap.of(naming.CLUSTER)["outbound|80||web.shop.svc.cluster.local"].message
    assert c.lb_policy == cluster_pb2.Cluster.RING_HASH
    assert c.ring_hash_lb_config.minimum_ring_size.value == 2048
    t = c.circuit_breakers.thresholds[0]
    assert (t.max_connections.value, t.max_pending_requests.value, t.max_requests.value,
            t.max_retries.value) == (10, 5, 20, 2)
    assert t.retry_budget.budget_percent.value == 25 and t.retry_budget.min_retry_concurrency.value == 4
    o = c.outlier_detection
    assert (o.consecutive_5xx.value, o.consecutive_gateway_failure.value,
            o.enforcing_consecutive_gateway_failure.value) == (3, 2, 100)
    assert (o.interval.seconds, o.base_ejection_time.seconds, o.max_ejection_time.seconds,
            o.max_ejection_percent.value) == (2, 5, 60, 50)
    vh = web_routes(snap)
    assert vh.routes[0].route.hash_policy[0].header.header_name == "x-user"
    wrapper = route_components_pb2.FilterConfig()
    vh.typed_per_filter_config[LOCAL_RATELIMIT].Unpack(wrapper)
    assert wrapper.is_optional  # proxyless gRPC clients lack this filter: they must skip it
    rl = local_rate_limit_pb2.LocalRateLimit()
    wrapper.config.Unpack(rl)
    assert (rl.token_bucket.max_tokens, rl.token_bucket.tokens_per_fill.value,
            rl.token_bucket.fill_interval.seconds) == (20, 20, 1)
    # Services without a policy keep the defaults.
    v1 = snap.of(naming.CLUSTER)["outbound|80||web-v1.shop.svc.cluster.local"].message
    assert v1.lb_policy == cluster_pb2.Cluster.ROUND_ROBIN and not v1.HasField("outlier_detection")


def test_least_request_choice_count(tmp_path: Path) -> None:
    policy = POLICY.replace("type: RingHash, minimumRingSize: 2048, hashOn: {header: X-User}",
                            "type: LeastRequest, choiceCount: 3")
    c = snapshot(tmp_path, SERVICES, policy).of(naming.CLUSTER)[
        "outbound|80||web.shop.svc.cluster.local"].message
    assert c.lb_policy == cluster_pb2.Cluster.LEAST_REQUEST
    assert c.least_request_lb_config.choice_count.value == 3


@pytest.mark.parametrize("text,needle", [
    (ROUTES.replace("value: /admin", "value: admin"), "must start with /"),
    (ROUTES.replace("request: 1500ms", "request: soon"), "not a duration"),
    (ROUTES.replace("grpcCodes: [unavailable]", "grpcCodes: [sometimes]"), "grpc retry code"),
    (POLICY.replace("type: RingHash", "type: Sticky"), "loadBalancer.type"),
    (POLICY.replace("targetRef: {kind: Service, name: web}", "targetRef: {kind: Gateway}"),
     "targetRef must name a Service"),
    (POLICY.replace("maxEjectionPercent: 50", "maxEjectionPercent: 150"), "maxEjectionPercent"),
])
def test_invalid_traffic_config_is_explained(tmp_path: Path, text: str, needle: str) -> None:
    p = tmp_path / "x.yaml"
    p.write_text(text)
    with pytest.raises(ManifestError, match=needle):
        parse_file(p)
