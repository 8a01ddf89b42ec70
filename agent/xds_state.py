"""What the agent holds of the xDS configuration, and what it makes of it.

Sans-IO: resources in, an immutable ``XdsConfig`` and a ``ServiceTable`` out.
``to_service_table`` is also the validation: a resource the agent cannot use
raises ``Rejected`` with a reason fit for a NACK's error_detail, and the
previous config stays in force.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2 as rc_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import any_pb2, json_format, message

from controlplane import naming
from controlplane.translate import LOCAL_RATELIMIT
from dataplane.backend import Backend
from dataplane.balancers import HashPolicy, LeastRequestConfig, RingHashConfig
from dataplane.policy.circuit_breaker import CircuitBreakerConfig
from dataplane.policy.outlier import OutlierConfig
from dataplane.policy.ratelimit import TokenBucketConfig
from dataplane.policy.retry import RetryBudget, RetryPolicy
from dataplane.routing import HeaderMatcher, Route, RouteAction, RouteTable, WeightedCluster
from dataplane.services import ClusterConfig, ServiceEntry, ServiceTable

MESSAGE_TYPES: dict[str, type[message.Message]] = {
    naming.CLUSTER: cluster_pb2.Cluster,
    naming.ENDPOINT: endpoint_pb2.ClusterLoadAssignment,
    naming.LISTENER: listener_pb2.Listener,
    naming.ROUTE: route_pb2.RouteConfiguration,
}
USABLE_HEALTH = (0, 1)  # UNKNOWN, HEALTHY
SUPPORTED_CLUSTER_TYPES = (cluster_pb2.Cluster.EDS, cluster_pb2.Cluster.STATIC)
SUPPORTED_LB = ("ROUND_ROBIN", "LEAST_REQUEST", "RING_HASH", "RANDOM")


class Rejected(ValueError):
    """A resource the agent cannot use; the message goes into the NACK."""


@dataclass(frozen=True)
class Record:
    name: str
    version: str
    resource: any_pb2.Any


def unpack(type_url: str, packed: any_pb2.Any) -> message.Message:
    cls = MESSAGE_TYPES.get(type_url)
    if cls is None:
        raise Rejected(f"resource type {type_url} is not one the agent subscribes to")
    if packed.type_url != type_url:
        raise Rejected(f"a {type_url} response carried a {packed.type_url or 'typeless'} resource")
    msg = cls()
    try:
        packed.Unpack(msg)
    except Exception:  # protobuf raises DecodeError or a RuntimeWarning-ish error
        raise Rejected(f"a {naming.SHORT[type_url]} resource could not be decoded") from None
    return msg


def name_of(type_url: str, msg: message.Message) -> str:
    if type_url == naming.ENDPOINT:
        return msg.cluster_name  # type: ignore[attr-defined,no-any-return]
    return msg.name  # type: ignore[attr-defined,no-any-return]


@dataclass(frozen=True)
class XdsConfig:
    """type_url -> name -> Record, plus the SotW version_info per type."""

    types: Mapping[str, Mapping[str, Record]] = field(
        default_factory=lambda: MappingProxyType({t: MappingProxyType({})
                                                  for t in naming.TYPE_ORDER}))
    version_info: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def of(self, type_url: str) -> Mapping[str, Record]:
        return self.types.get(type_url, MappingProxyType({}))

    def replaced(self, type_url: str, records: Iterable[Record], version_info: str) -> XdsConfig:
        """State of the world: the type's whole set is replaced."""
        return self._with(type_url, {r.name: r for r in records}, version_info)

    def changed(self, type_url: str, upserts: Iterable[Record], removed: Iterable[str]) -> XdsConfig:
        """Incremental: some resources added or changed, some removed."""
        cur = dict(self.of(type_url))
        for name in removed:
            cur.pop(name, None)
        for r in upserts:
            cur[r.name] = r
        return self._with(type_url, cur, self.version_info.get(type_url, ""))

    def _with(self, type_url: str, records: dict[str, Record], version_info: str) -> XdsConfig:
        types = dict(self.types)
        types[type_url] = MappingProxyType(records)
        versions = dict(self.version_info)
        versions[type_url] = version_info
        return XdsConfig(MappingProxyType(types), MappingProxyType(versions))

    def type_version(self, type_url: str) -> str:
        """The SotW version if one was given, else a digest of the resource versions."""
        if self.version_info.get(type_url):
            return self.version_info[type_url]
        h = hashlib.sha256()
        for name, r in sorted(self.of(type_url).items()):
            h.update(f"{name}={r.version};".encode())
        return h.hexdigest()[:16] if self.of(type_url) else ""

    def messages(self, type_url: str) -> dict[str, message.Message]:
        return {n: unpack(type_url, r.resource) for n, r in self.of(type_url).items()}

    # -- what the agent subscribes to beyond the wildcards -------------------
    def eds_names(self) -> set[str]:
        out = set()
        for c in self.messages(naming.CLUSTER).values():
            assert isinstance(c, cluster_pb2.Cluster)
            if c.type == cluster_pb2.Cluster.EDS:
                out.add(c.eds_cluster_config.service_name or c.name)
        return out

    def rds_names(self) -> set[str]:
        out = set()
        for lis in self.messages(naming.LISTENER).values():
            assert isinstance(lis, listener_pb2.Listener)
            for chain in lis.filter_chains:
                for f in chain.filters:
                    if f.typed_config.Is(hcm_pb2.HttpConnectionManager.DESCRIPTOR):
                        hcm = hcm_pb2.HttpConnectionManager()
                        f.typed_config.Unpack(hcm)
                        if hcm.HasField("rds"):
                            out.add(hcm.rds.route_config_name)
        return out

    def dump(self) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for t in naming.TYPE_ORDER:
            out[naming.SHORT[t]] = [
                {"name": n, "version": r.version,
                 "resource": json_format.MessageToDict(unpack(t, r.resource))}
                for n, r in sorted(self.of(t).items())]
        return out


def _ipv4(addr: str, what: str) -> str:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        raise Rejected(f"{what}: {addr!r} is not an IP address (hostnames are not resolved)") from None
    if ip.version != 4:
        raise Rejected(f"{what}: {addr} is IPv6, which the agent does not redirect yet "
                       "(cgroup/connect6 is not built)")
    return str(ip)


def _hcm_of(lis: listener_pb2.Listener) -> tuple[hcm_pb2.HttpConnectionManager | None, str | None, bool]:
    """(HTTP connection manager, tcp_proxy cluster, whether HTTP is sniffed) of a listener."""
    if not lis.filter_chains:
        raise Rejected(f"listener {lis.name}: no filter chain")
    hcm: hcm_pb2.HttpConnectionManager | None = None
    tcp_cluster: str | None = None
    sniffed = False
    for chain in lis.filter_chains:
        if not chain.filters:
            raise Rejected(f"listener {lis.name}: filter chain {chain.name!r} has no filter")
        flt = chain.filters[-1]
        if flt.typed_config.Is(tcp_proxy_pb2.TcpProxy.DESCRIPTOR):
            tcp = tcp_proxy_pb2.TcpProxy()
            flt.typed_config.Unpack(tcp)
            tcp_cluster = tcp.cluster or (tcp.weighted_clusters.clusters[0].name
                                          if tcp.weighted_clusters.clusters else None)
            if tcp_cluster is None:
                raise Rejected(f"listener {lis.name}: tcp_proxy names no cluster")
        elif flt.typed_config.Is(hcm_pb2.HttpConnectionManager.DESCRIPTOR):
            hcm = hcm_pb2.HttpConnectionManager()
            flt.typed_config.Unpack(hcm)
            sniffed = bool(chain.filter_chain_match.application_protocols)
        else:
            raise Rejected(f"listener {lis.name}: filter {flt.name or flt.typed_config.type_url} "
                           "is not supported (tcp_proxy or http_connection_manager)")
    return hcm, tcp_cluster, sniffed and tcp_cluster is not None


def _string_matcher(name: str, sm: string_pb2.StringMatcher, where: str) -> HeaderMatcher:
    which = sm.WhichOneof("match_pattern")
    if which == "exact":
        return HeaderMatcher(name=name, exact=sm.exact)
    if which == "safe_regex":
        return HeaderMatcher(name=name, regex=_regex(sm.safe_regex.regex, where))
    raise Rejected(f"{where}: header match {which} is not supported (exact, safe_regex)")


def _regex(pattern: str, where: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise Rejected(f"{where}: regex {pattern!r} does not compile: {exc}") from None


def _route(r: rc_pb2.Route, where: str) -> Route:
    m = r.match
    kw: dict[str, Any] = {}
    which = m.WhichOneof("path_specifier")
    if which == "prefix":
        kw["prefix"] = m.prefix
    elif which == "path":
        kw["path"] = m.path
    elif which == "path_separated_prefix":
        kw["separated_prefix"] = m.path_separated_prefix
    elif which == "safe_regex":
        kw["regex"] = _regex(m.safe_regex.regex, where)
    else:
        raise Rejected(f"{where}: path match {which} is not supported")
    headers = []
    for h in m.headers:
        name = h.name.lower()
        if h.HasField("string_match"):
            headers.append(_string_matcher(name, h.string_match, where))
        elif h.present_match:
            headers.append(HeaderMatcher(name=name, present=True))
        else:
            raise Rejected(f"{where}: header matcher for {h.name} is not supported")
    which = r.WhichOneof("action")
    if which == "direct_response":
        return Route(name=r.name, action=RouteAction(direct_status=r.direct_response.status),
                     headers=tuple(headers), **kw)
    if which != "route":
        raise Rejected(f"{where}: route action {which} is not supported (route, direct_response)")
    a = r.route
    if a.cluster:
        clusters: tuple[WeightedCluster, ...] = (WeightedCluster(a.cluster, 1),)
    elif a.weighted_clusters.clusters:
        clusters = tuple(WeightedCluster(c.name, c.weight.value) for c in a.weighted_clusters.clusters)
    else:
        raise Rejected(f"{where}: the route names no cluster")
    retry = None
    if a.HasField("retry_policy"):
        rp = a.retry_policy
        try:
            retry = RetryPolicy.from_envoy(
                rp.retry_on, rp.num_retries.value if rp.HasField("num_retries") else 1,
                rp.per_try_timeout.ToNanoseconds() / 1e9 if rp.HasField("per_try_timeout") else None,
                frozenset(rp.retriable_status_codes))
        except ValueError as exc:
            raise Rejected(f"{where}: {exc}") from None
    hashes = []
    for hp in a.hash_policy:
        kind = hp.WhichOneof("policy_specifier")
        if kind == "header":
            hashes.append(HashPolicy.header(hp.header.header_name.lower(), hp.terminal))
        elif kind == "cookie":
            hashes.append(HashPolicy.cookie(hp.cookie.name, hp.terminal))
        elif kind == "connection_properties" and hp.connection_properties.source_ip:
            hashes.append(HashPolicy.source_ip(hp.terminal))
        else:
            raise Rejected(f"{where}: hash policy {kind} is not supported")
    timeout = a.timeout.ToNanoseconds() / 1e9 if a.HasField("timeout") else None
    action = RouteAction(clusters=clusters, timeout=timeout or None, retry=retry,
                         hash_policies=tuple(hashes))
    return Route(name=r.name, action=action, headers=tuple(headers), **kw)


def _rate_limit(vh: rc_pb2.VirtualHost, where: str) -> TokenBucketConfig | None:
    packed = vh.typed_per_filter_config.get(LOCAL_RATELIMIT)
    if packed is None:
        return None
    if packed.Is(rc_pb2.FilterConfig.DESCRIPTOR):
        wrapper = rc_pb2.FilterConfig()
        packed.Unpack(wrapper)
        packed = wrapper.config
    cfg = local_rate_limit_pb2.LocalRateLimit()
    if not packed.Unpack(cfg):
        raise Rejected(f"{where}: {LOCAL_RATELIMIT} config is not a LocalRateLimit")
    if not cfg.HasField("token_bucket"):
        return None
    tb = cfg.token_bucket
    try:
        return TokenBucketConfig(max_tokens=tb.max_tokens,
                                 fill_interval=tb.fill_interval.ToNanoseconds() / 1e9,
                                 tokens_per_fill=tb.tokens_per_fill.value if tb.HasField(
                                     "tokens_per_fill") else 1)
    except ValueError as exc:
        raise Rejected(f"{where}: {exc}") from None


def route_table(rc: route_pb2.RouteConfiguration) -> RouteTable:
    if not rc.virtual_hosts:
        return RouteTable(name=rc.name)
    # One virtual host per service port is what our control plane sends; the
    # VIP already chose the service, so the Host header need not.
    vh = rc.virtual_hosts[0]
    where = f"route {rc.name}"
    routes = tuple(_route(r, f"{where} {r.name or '#' + str(i)}") for i, r in enumerate(vh.routes))
    return RouteTable(name=rc.name, routes=routes, rate_limit=_rate_limit(vh, where))


def _backends(cla: endpoint_pb2.ClusterLoadAssignment) -> tuple[Backend, ...]:
    out = []
    for loc in cla.endpoints:
        for lb in loc.lb_endpoints:
            sa = lb.endpoint.address.socket_address
            ip = _ipv4(sa.address, f"endpoints {cla.cluster_name}")
            if not 0 < sa.port_value < 65536:
                raise Rejected(f"endpoints {cla.cluster_name}: port {sa.port_value} out of range")
            if lb.health_status in USABLE_HEALTH:
                out.append(Backend(ip, sa.port_value, lb.endpoint.hostname or None))
    return tuple(out)


def cluster_config(c: cluster_pb2.Cluster, backends: tuple[Backend, ...]) -> ClusterConfig:
    where = f"cluster {c.name}"
    if c.type not in SUPPORTED_CLUSTER_TYPES:
        kind = cluster_pb2.Cluster.DiscoveryType.Name(c.type)
        raise Rejected(f"{where}: discovery type {kind} is not supported (EDS, STATIC)")
    policy = cluster_pb2.Cluster.LbPolicy.Name(c.lb_policy)
    if policy not in SUPPORTED_LB:
        raise Rejected(f"{where}: lb_policy {policy} is not supported ({', '.join(SUPPORTED_LB)})")
    parsed = naming.parse_cluster_name(c.name)
    service = f"{parsed[1]}/{parsed[0]}" if parsed else c.name
    try:
        lr = LeastRequestConfig(c.least_request_lb_config.choice_count.value or 2) \
            if c.HasField("least_request_lb_config") else None
        rh = RingHashConfig(c.ring_hash_lb_config.minimum_ring_size.value or 1024) \
            if c.HasField("ring_hash_lb_config") else None
        cb = CircuitBreakerConfig()
        for t in c.circuit_breakers.thresholds:
            if t.priority != 0:
                continue  # only the DEFAULT priority is routed to
            d = CircuitBreakerConfig()
            budget = None
            if t.HasField("retry_budget"):
                budget = RetryBudget(
                    budget_percent=t.retry_budget.budget_percent.value
                    if t.retry_budget.HasField("budget_percent") else 20.0,
                    min_retry_concurrency=t.retry_budget.min_retry_concurrency.value
                    if t.retry_budget.HasField("min_retry_concurrency") else 3)
            cb = CircuitBreakerConfig(
                max_connections=t.max_connections.value if t.HasField("max_connections")
                else d.max_connections,
                max_pending_requests=t.max_pending_requests.value
                if t.HasField("max_pending_requests") else d.max_pending_requests,
                max_requests=t.max_requests.value if t.HasField("max_requests") else d.max_requests,
                max_retries=t.max_retries.value if t.HasField("max_retries") else d.max_retries,
                retry_budget=budget)
        outlier = None
        if c.HasField("outlier_detection"):
            o = c.outlier_detection
            d2 = OutlierConfig()

            def secs(field_name: str, default: float) -> float:
                return getattr(o, field_name).ToNanoseconds() / 1e9 if o.HasField(field_name) \
                    else default

            def num(field_name: str, default: int) -> int:
                return getattr(o, field_name).value if o.HasField(field_name) else default

            outlier = OutlierConfig(
                consecutive_5xx=num("consecutive_5xx", d2.consecutive_5xx),
                consecutive_gateway_failure=num("consecutive_gateway_failure",
                                                d2.consecutive_gateway_failure),
                enforcing_consecutive_5xx=num("enforcing_consecutive_5xx", d2.enforcing_consecutive_5xx),
                enforcing_consecutive_gateway_failure=num(
                    "enforcing_consecutive_gateway_failure", d2.enforcing_consecutive_gateway_failure),
                interval=secs("interval", d2.interval),
                base_ejection_time=secs("base_ejection_time", d2.base_ejection_time),
                max_ejection_time=secs("max_ejection_time", 0.0) or None,
                max_ejection_percent=num("max_ejection_percent", d2.max_ejection_percent))
    except ValueError as exc:
        raise Rejected(f"{where}: {exc}") from None
    return ClusterConfig(name=c.name, service=service, backends=backends, lb_policy=policy,
                         least_request=lr, ring_hash=rh, circuit_breaker=cb, outlier=outlier)


def to_service_table(config: XdsConfig) -> ServiceTable:
    """Validate the whole config and build the proxy's table from it."""
    loads = config.messages(naming.ENDPOINT)
    backends_by_name = {name: _backends(cla) for name, cla in loads.items()}  # type: ignore[arg-type]
    clusters: dict[str, ClusterConfig] = {}
    for name, c in config.messages(naming.CLUSTER).items():
        assert isinstance(c, cluster_pb2.Cluster)
        if c.type == cluster_pb2.Cluster.STATIC:
            backends = _backends(c.load_assignment)
        else:
            backends = backends_by_name.get(c.eds_cluster_config.service_name or name, ())
        clusters[name] = cluster_config(c, backends)
    tables = {name: route_table(rc)  # type: ignore[arg-type]
              for name, rc in config.messages(naming.ROUTE).items()}
    entries: dict[tuple[str, int], ServiceEntry] = {}
    listeners = config.messages(naming.LISTENER)
    for name in sorted(listeners):
        lis = listeners[name]
        assert isinstance(lis, listener_pb2.Listener)
        if lis.HasField("api_listener"):
            continue  # for proxyless gRPC clients, not for the node proxy
        sa = lis.address.socket_address
        vip = _ipv4(sa.address, f"listener {lis.name}")
        hcm, tcp_cluster, sniffed = _hcm_of(lis)
        meta = lis.metadata.filter_metadata.get("nodemesh")
        fields = meta.fields if meta else {}
        port_name = fields["port_name"].string_value if "port_name" in fields else ""
        routes = None
        if hcm is not None:
            routes = route_table(hcm.route_config) if hcm.HasField("route_config") \
                else tables.get(hcm.rds.route_config_name)
            if routes is None and tcp_cluster is None:
                continue  # its route has not arrived yet: not redirected until it has
        if hcm is None:
            protocol = "tcp"
        elif sniffed:
            protocol = "auto"
        else:
            declared = fields["protocol"].string_value if "protocol" in fields else "http"
            protocol = declared if declared in ("http", "http2", "grpc") else "http"
        # The cluster opaque traffic goes to (and the L4 fallback of HTTP ports).
        l4_cluster = tcp_cluster
        if l4_cluster is None and routes is not None:
            l4_cluster = next((r.action.clusters[0].name for r in routes.routes
                               if r.action.clusters), None)
        cluster = clusters.get(l4_cluster) if l4_cluster else None
        parsed = naming.parse_cluster_name(l4_cluster) if l4_cluster else None
        service = f"{parsed[1]}/{parsed[0]}" if parsed else (l4_cluster or lis.name)
        entries[(vip, sa.port_value)] = ServiceEntry(
            id=len(entries) + 1, service=service, port_name=port_name, vip=vip,
            port=sa.port_value, backends=cluster.backends if cluster else (),
            protocol=protocol, cluster=l4_cluster, routes=routes)
    return ServiceTable(MappingProxyType(entries), MappingProxyType(clusters))
