"""Registry -> standard Envoy v3 resources (one immutable ``Snapshot``).

Per service port: a Cluster (EDS over ADS), its ClusterLoadAssignment (one
LocalityLbEndpoints per zone, health from readiness), a Listener on VIP:port
(tcp_proxy for opaque ports; HTTP connection manager with RDS for HTTP and
gRPC ports), and for HTTP/gRPC ports a RouteConfiguration plus an API
listener named host:port for proxyless gRPC clients.

Each resource carries its own version, a hash of its deterministic encoding,
so an unchanged resource keeps its version and is never resent.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, health_check_pb2
from envoy.config.core.v3 import base_pb2 as core_base
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import api_listener_pb2, listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from envoy.type.v3 import percent_pb2, token_bucket_pb2
from google.protobuf import any_pb2, duration_pb2, message, struct_pb2, wrappers_pb2

from controlplane import naming
from controlplane.registry import Endpoint, Registry, Service, ServicePort
from controlplane.traffic import BackendRef, HttpRoute, RouteMatch, RouteRule, TrafficPolicy
from dataplane.protocols.detect import declared

TCP_PROXY = "envoy.filters.network.tcp_proxy"
HCM = "envoy.filters.network.http_connection_manager"
ROUTER = "envoy.filters.http.router"
LOCAL_RATELIMIT = "envoy.filters.http.local_ratelimit"
LB_POLICY = {"RoundRobin": cluster_pb2.Cluster.ROUND_ROBIN,
             "LeastRequest": cluster_pb2.Cluster.LEAST_REQUEST,
             "Random": cluster_pb2.Cluster.RANDOM, "RingHash": cluster_pb2.Cluster.RING_HASH}
METADATA_KEY = "nodemesh"


def protocol_of(port: ServicePort) -> str:
    """What the proxies should speak on a Service port: ``http``, ``http2``,
    ``grpc`` or ``tcp`` when declared (appProtocol, else the port name's
    prefix, as Istio reads them), ``auto`` when nothing is declared: then the
    listener carries both an HTTP and a TCP filter chain and the proxy sniffs.
    One rule for both sides: the proxy's own detection module decides."""
    found = declared(port.app_protocol, port.name, port=port.port)
    return {"http1": "http", "http2": "http2", "grpc": "grpc", "tcp": "tcp", "tls": "tcp",
            None: "auto"}[found]


@dataclass(frozen=True)
class Resource:
    name: str
    version: str
    message: message.Message

    def packed(self) -> any_pb2.Any:
        a = any_pb2.Any()
        a.Pack(self.message)
        return a


def _version(msg: message.Message) -> str:
    return hashlib.sha256(msg.SerializeToString(deterministic=True)).hexdigest()[:16]


@dataclass(frozen=True)
class Snapshot:
    """What every client should have: type_url -> name -> Resource."""

    resources: Mapping[str, Mapping[str, Resource]] = field(
        default_factory=lambda: MappingProxyType({t: MappingProxyType({})
                                                  for t in naming.TYPE_ORDER}))

    def of(self, type_url: str) -> Mapping[str, Resource]:
        return self.resources.get(type_url, MappingProxyType({}))

    def type_version(self, type_url: str) -> str:
        """The state-of-the-world version of a type: changes iff any resource does."""
        h = hashlib.sha256()
        for name, res in sorted(self.of(type_url).items()):
            h.update(f"{name}={res.version};".encode())
        return h.hexdigest()[:16]


def _socket(ip: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(
        address=ip, port_value=port, protocol=address_pb2.SocketAddress.TCP))


def _ads() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(ads=config_source_pb2.AggregatedConfigSource(),
                                          resource_api_version=config_source_pb2.V3)


def _metadata(svc: Service, port: ServicePort, protocol: str) -> base_pb2.Metadata:
    fields = struct_pb2.Struct()
    fields.update({"service": svc.name, "namespace": svc.namespace, "port_name": port.name,
                   "protocol": protocol})
    return base_pb2.Metadata(filter_metadata={METADATA_KEY: fields})


def _seconds(value: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(round(value * 1e9)))
    return d


def _cluster(svc: Service, port: ServicePort, protocol: str,
             policy: TrafficPolicy | None) -> cluster_pb2.Cluster:
    name = naming.cluster_name(svc.name, svc.namespace, port.port)
    c = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads(),
                                                                 service_name=name),
        connect_timeout=duration_pb2.Duration(seconds=1),
        lb_policy=cluster_pb2.Cluster.ROUND_ROBIN,
        metadata=_metadata(svc, port, protocol),
    )
    if policy is not None:
        _apply_policy(c, policy)
    return c


def _apply_policy(c: cluster_pb2.Cluster, policy: TrafficPolicy) -> None:
    """TrafficPolicy fields onto the Envoy Cluster fields of the same meaning."""
    lb = policy.load_balancer
    if lb is not None:
        c.lb_policy = LB_POLICY[lb.policy]
        if lb.policy == "LeastRequest":
            c.least_request_lb_config.choice_count.value = lb.choice_count
        if lb.policy == "RingHash":
            c.ring_hash_lb_config.minimum_ring_size.value = lb.minimum_ring_size
    cb = policy.circuit_breaker
    if cb is not None:
        t = c.circuit_breakers.thresholds.add()
        t.priority = core_base.DEFAULT
        t.max_connections.value = cb.max_connections
        t.max_pending_requests.value = cb.max_pending_requests
        t.max_requests.value = cb.max_requests
        t.max_retries.value = cb.max_retries
        if cb.retry_budget_percent is not None:
            t.retry_budget.budget_percent.value = cb.retry_budget_percent
        if cb.min_retry_concurrency is not None:
            t.retry_budget.min_retry_concurrency.value = cb.min_retry_concurrency
    od = policy.outlier_detection
    if od is not None:
        o = c.outlier_detection
        o.consecutive_5xx.value = od.consecutive_5xx
        if od.consecutive_gateway_errors is not None:
            o.consecutive_gateway_failure.value = od.consecutive_gateway_errors
            o.enforcing_consecutive_gateway_failure.value = 100
        o.interval.CopyFrom(_seconds(od.interval))
        o.base_ejection_time.CopyFrom(_seconds(od.base_ejection_time))
        o.max_ejection_time.CopyFrom(_seconds(od.max_ejection_time))
        o.max_ejection_percent.value = od.max_ejection_percent


def _target_port(port: ServicePort, ep: Endpoint) -> int | None:
    if port.name in ep.ports:
        return ep.ports[port.name]
    if len(ep.ports) == 1 and port.name == "":
        return next(iter(ep.ports.values()))
    return port.target_port if isinstance(port.target_port, int) else None


def _load_assignment(svc: Service, port: ServicePort,
                     endpoints: tuple[Endpoint, ...]) -> endpoint_pb2.ClusterLoadAssignment:
    by_zone: dict[str, list[endpoint_components_pb2.LbEndpoint]] = {}
    seen: set[tuple[str, int]] = set()
    for ep in endpoints:
        target = _target_port(port, ep)
        if target is None or (ep.ip, target) in seen:
            continue
        seen.add((ep.ip, target))
        health = health_check_pb2.HEALTHY if ep.ready else health_check_pb2.UNHEALTHY
        by_zone.setdefault(ep.zone or "", []).append(endpoint_components_pb2.LbEndpoint(
            endpoint=endpoint_components_pb2.Endpoint(address=_socket(ep.ip, target)),
            health_status=health,
            load_balancing_weight=wrappers_pb2.UInt32Value(value=1)))
    localities = []
    for zone in sorted(by_zone):
        lbs = by_zone[zone]
        localities.append(endpoint_components_pb2.LocalityLbEndpoints(
            locality=base_pb2.Locality(zone=zone), lb_endpoints=lbs,
            load_balancing_weight=wrappers_pb2.UInt32Value(value=max(1, len(lbs)))))
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=naming.cluster_name(svc.name, svc.namespace, port.port),
        endpoints=localities)


def _hcm(svc: Service, port: ServicePort) -> hcm_pb2.HttpConnectionManager:
    return hcm_pb2.HttpConnectionManager(
        stat_prefix=naming.cluster_name(svc.name, svc.namespace, port.port),
        rds=hcm_pb2.Rds(config_source=_ads(),
                        route_config_name=naming.route_name(svc.name, svc.namespace, port.port)),
        # The rate limit filter is off unless a route enables it (per-route
        # config). Optional, so that clients without it (proxyless gRPC) skip it
        # rather than NACK the listener.
        http_filters=[
            hcm_pb2.HttpFilter(name=LOCAL_RATELIMIT, is_optional=True, typed_config=_pack(
                local_rate_limit_pb2.LocalRateLimit(stat_prefix="http_local_rate_limiter"))),
            hcm_pb2.HttpFilter(name=ROUTER, typed_config=_pack(router_pb2.Router()))])


def _pack(msg: message.Message) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    return a


def _vip_listener(svc: Service, port: ServicePort, protocol: str) -> listener_pb2.Listener:
    assert svc.cluster_ip is not None
    cluster = naming.cluster_name(svc.name, svc.namespace, port.port)
    tcp = listener_components_pb2.Filter(name=TCP_PROXY, typed_config=_pack(
        tcp_proxy_pb2.TcpProxy(stat_prefix=cluster, cluster=cluster)))
    http = listener_components_pb2.Filter(name=HCM, typed_config=_pack(_hcm(svc, port)))
    if protocol == "tcp":
        chains = [listener_components_pb2.FilterChain(name="tcp", filters=[tcp])]
    elif protocol == "auto":
        # Nothing declared: the proxy sniffs the first bytes (as Envoy's
        # http_inspector would) and takes the HTTP chain for HTTP, else TCP.
        chains = [listener_components_pb2.FilterChain(
                      name="http", filters=[http],
                      filter_chain_match=listener_components_pb2.FilterChainMatch(
                          application_protocols=["http/1.1", "h2c"])),
                  listener_components_pb2.FilterChain(name="tcp", filters=[tcp])]
    else:
        chains = [listener_components_pb2.FilterChain(name="http", filters=[http])]
    return listener_pb2.Listener(
        name=naming.vip_listener_name(svc.cluster_ip, port.port),
        address=_socket(svc.cluster_ip, port.port),
        # Captured by BPF, never bound: the node proxy serves it from 15001.
        bind_to_port=wrappers_pb2.BoolValue(value=False),
        traffic_direction=base_pb2.OUTBOUND,
        filter_chains=chains,
        metadata=_metadata(svc, port, protocol),
    )


def _api_listener(svc: Service, port: ServicePort) -> listener_pb2.Listener:
    return listener_pb2.Listener(
        name=naming.api_listener_name(svc.name, svc.namespace, port.port),
        api_listener=api_listener_pb2.ApiListener(api_listener=_pack(_hcm(svc, port))))


def _match(m: RouteMatch) -> rc.RouteMatch:
    out = rc.RouteMatch()
    if m.path_kind == "Exact":
        out.path = m.path
    elif m.path_kind == "RegularExpression":
        out.safe_regex.CopyFrom(regex_pb2.RegexMatcher(regex=m.path))
    elif m.path == "/":
        out.prefix = "/"
    else:
        # Gateway API's PathPrefix matches whole segments: /api matches /api/x, not /apix.
        out.path_separated_prefix = m.path.rstrip("/")
    for h in m.headers:
        sm = string_pb2.StringMatcher(exact=h.value) if h.kind == "Exact" else \
            string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=h.value))
        out.headers.add(name=h.name, string_match=sm)
    if m.method:
        out.headers.add(name=":method", string_match=string_pb2.StringMatcher(exact=m.method))
    return out


def _precedence(m: RouteMatch) -> tuple[int, int, int, int]:
    """Gateway API's order: exact path, then longest prefix, then method, then
    more header matches (regexes last: the spec leaves them to the implementation)."""
    kind = {"Exact": 0, "PathPrefix": 1, "RegularExpression": 2}[m.path_kind]
    return (kind, -len(m.path), 0 if m.method else 1, -len(m.headers))


def _retry_policy(rule: RouteRule) -> rc.RetryPolicy | None:
    r = rule.retry
    if r is None or r.attempts == 0:
        return None
    on = list(r.on)
    if r.codes:
        on.append("retriable-status-codes")
    on += list(r.grpc_codes)
    p = rc.RetryPolicy(retry_on=",".join(dict.fromkeys(on or ["5xx"])), retriable_status_codes=r.codes)
    p.num_retries.value = r.attempts
    if r.per_try_timeout is not None:
        p.per_try_timeout.CopyFrom(_seconds(r.per_try_timeout))
    return p


def _hash_policies(policy: TrafficPolicy | None) -> list[rc.RouteAction.HashPolicy]:
    lb = policy.load_balancer if policy else None
    if lb is None or lb.policy != "RingHash":
        return []
    if lb.hash_header:
        return [rc.RouteAction.HashPolicy(header=rc.RouteAction.HashPolicy.Header(
            header_name=lb.hash_header))]
    if lb.hash_cookie:
        return [rc.RouteAction.HashPolicy(cookie=rc.RouteAction.HashPolicy.Cookie(
            name=lb.hash_cookie))]
    return [rc.RouteAction.HashPolicy(connection_properties=rc.RouteAction.HashPolicy
                                      .ConnectionProperties(source_ip=True))]


def _action(rule: RouteRule, default_port: int, hashes: list[rc.RouteAction.HashPolicy],
            route: rc.Route) -> None:
    weighted = [(naming.cluster_name(b.service, b.namespace, b.port or default_port), b.weight)
                for b in rule.backends if b.weight > 0]
    if not weighted:
        # Gateway API: a rule with no usable backend answers 500.
        route.direct_response.status = 500
        return
    action = route.route
    if len(weighted) == 1:
        action.cluster = weighted[0][0]
    else:
        for name, weight in weighted:
            action.weighted_clusters.clusters.add(name=name).weight.value = weight
    # No timeout unless asked (Envoy's default of 15 s would surprise a mesh user).
    action.timeout.CopyFrom(_seconds(rule.timeout or 0.0))
    retry = _retry_policy(rule)
    if retry is not None:
        action.retry_policy.CopyFrom(retry)
    action.hash_policy.extend(hashes)


def _routes(svc: Service, port: ServicePort, attached: list[HttpRoute],
            policy: TrafficPolicy | None) -> list[rc.Route]:
    hashes = _hash_policies(policy)
    if not attached:
        default = rc.Route(name="default", match=rc.RouteMatch(prefix="/"))
        _action(RouteRule(matches=(), backends=(BackendRef(svc.name, svc.namespace, port.port),)),
                port.port, hashes, default)
        return [default]
    entries = []
    for r in attached:
        for i, rule in enumerate(r.rules):
            for m in rule.matches:
                entries.append((_precedence(m), r.key, i, m, rule))
    out = []
    for _, key, i, m, rule in sorted(entries, key=lambda e: (e[0], e[1], e[2])):
        route = rc.Route(name=f"{key}/rule-{i}", match=_match(m))
        _action(rule, port.port, hashes, route)
        out.append(route)
    return out


def _rate_limit(policy: TrafficPolicy | None) -> dict[str, any_pb2.Any]:
    if policy is None or policy.rate_limit is None:
        return {}
    rl = policy.rate_limit
    cfg = local_rate_limit_pb2.LocalRateLimit(
        stat_prefix="http_local_rate_limiter",
        token_bucket=token_bucket_pb2.TokenBucket(
            max_tokens=rl.max_tokens, tokens_per_fill=wrappers_pb2.UInt32Value(value=rl.tokens_per_fill),
            fill_interval=_seconds(rl.fill_interval)))
    full = percent_pb2.FractionalPercent(numerator=100, denominator=percent_pb2.FractionalPercent.HUNDRED)
    cfg.filter_enabled.default_value.CopyFrom(full)
    cfg.filter_enforced.default_value.CopyFrom(full)
    return {LOCAL_RATELIMIT: _pack(cfg)}


def _route(svc: Service, port: ServicePort, attached: list[HttpRoute],
           policy: TrafficPolicy | None) -> route_pb2.RouteConfiguration:
    host = naming.host(svc.name, svc.namespace)
    domains = [host, f"{host}:{port.port}", f"{svc.name}.{svc.namespace}",
               f"{svc.name}.{svc.namespace}:{port.port}", svc.name, f"{svc.name}:{port.port}"]
    if svc.cluster_ip:
        domains += [svc.cluster_ip, f"{svc.cluster_ip}:{port.port}"]
    vh = route_components_pb2.VirtualHost(name=f"{host}:{port.port}", domains=domains,
                                          routes=_routes(svc, port, attached, policy))
    for name, cfg in _rate_limit(policy).items():
        # Wrapped as optional for the same reason as the filter itself.
        vh.typed_per_filter_config[name].CopyFrom(
            _pack(route_components_pb2.FilterConfig(config=cfg, is_optional=True)))
    return route_pb2.RouteConfiguration(name=naming.route_name(svc.name, svc.namespace, port.port),
                                        virtual_hosts=[vh])


def translate(registry: Registry) -> Snapshot:
    out: dict[str, dict[str, Resource]] = {t: {} for t in naming.TYPE_ORDER}

    def add(type_url: str, name: str, msg: message.Message) -> None:
        out[type_url][name] = Resource(name, _version(msg), msg)

    for key in sorted(registry.services):
        svc = registry.services[key]
        endpoints = registry.endpoints_of(svc)
        for port in svc.ports:
            if port.protocol.upper() != "TCP":
                continue
            protocol = protocol_of(port)
            cname = naming.cluster_name(svc.name, svc.namespace, port.port)
            policy = registry.policies.get(svc.key)
            add(naming.CLUSTER, cname, _cluster(svc, port, protocol, policy))
            add(naming.ENDPOINT, cname, _load_assignment(svc, port, endpoints))
            if svc.cluster_ip is not None:
                lis = _vip_listener(svc, port, protocol)
                add(naming.LISTENER, lis.name, lis)
            if protocol != "tcp":
                # An HTTP route for declared HTTP ports and sniffed ("auto") ones.
                api = _api_listener(svc, port)
                add(naming.LISTENER, api.name, api)
                route = _route(svc, port, registry.routes_for(svc, port.port), policy)
                add(naming.ROUTE, route.name, route)
    return Snapshot(MappingProxyType({t: MappingProxyType(r) for t, r in out.items()}))
