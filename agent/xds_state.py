"""What the agent holds of the xDS configuration, and what it makes of it.

Sans-IO: resources in, an immutable ``XdsConfig`` and a ``ServiceTable`` out.
``to_service_table`` is also the validation: a resource the agent cannot use
raises ``Rejected`` with a reason fit for a NACK's error_detail, and the
previous config stays in force.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf import any_pb2, json_format, message

from controlplane import naming
from dataplane.services import Backend, ServiceEntry, ServiceTable

MESSAGE_TYPES: dict[str, type[message.Message]] = {
    naming.CLUSTER: cluster_pb2.Cluster,
    naming.ENDPOINT: endpoint_pb2.ClusterLoadAssignment,
    naming.LISTENER: listener_pb2.Listener,
    naming.ROUTE: route_pb2.RouteConfiguration,
}
USABLE_HEALTH = (0, 1)  # UNKNOWN, HEALTHY
SUPPORTED_CLUSTER_TYPES = (cluster_pb2.Cluster.EDS, cluster_pb2.Cluster.STATIC)


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


def _listener_cluster(lis: listener_pb2.Listener, routes: Mapping[str, message.Message]) -> str | None:
    """The cluster a listener sends its traffic to; None while its route is not known yet."""
    if not lis.filter_chains or not lis.filter_chains[0].filters:
        raise Rejected(f"listener {lis.name}: no filter chain")
    flt = lis.filter_chains[0].filters[-1]
    if flt.typed_config.Is(tcp_proxy_pb2.TcpProxy.DESCRIPTOR):
        tcp = tcp_proxy_pb2.TcpProxy()
        flt.typed_config.Unpack(tcp)
        if tcp.cluster:
            return tcp.cluster
        if tcp.weighted_clusters.clusters:
            return tcp.weighted_clusters.clusters[0].name
        raise Rejected(f"listener {lis.name}: tcp_proxy names no cluster")
    if flt.typed_config.Is(hcm_pb2.HttpConnectionManager.DESCRIPTOR):
        hcm = hcm_pb2.HttpConnectionManager()
        flt.typed_config.Unpack(hcm)
        if hcm.HasField("route_config"):
            route: message.Message | None = hcm.route_config
        else:
            route = routes.get(hcm.rds.route_config_name)
        if route is None:
            return None
        assert isinstance(route, route_pb2.RouteConfiguration)
        for vh in route.virtual_hosts:
            for r in vh.routes:
                if r.route.cluster:
                    return r.route.cluster
                if r.route.weighted_clusters.clusters:
                    return r.route.weighted_clusters.clusters[0].name
        return None  # only direct responses: nothing for an L4 proxy to forward to
    raise Rejected(f"listener {lis.name}: filter {flt.name or flt.typed_config.type_url} "
                   "is not supported (tcp_proxy or http_connection_manager)")


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


def to_service_table(config: XdsConfig) -> ServiceTable:
    """Validate the whole config and build the proxy's table from it."""
    clusters = config.messages(naming.CLUSTER)
    loads = config.messages(naming.ENDPOINT)
    routes = config.messages(naming.ROUTE)
    for c in clusters.values():
        assert isinstance(c, cluster_pb2.Cluster)
        if c.type not in SUPPORTED_CLUSTER_TYPES:
            kind = cluster_pb2.Cluster.DiscoveryType.Name(c.type)
            raise Rejected(f"cluster {c.name}: discovery type {kind} is not supported (EDS, STATIC)")
    backends_by_cluster = {name: _backends(cla) for name, cla in loads.items()}  # type: ignore[arg-type]
    entries: dict[tuple[str, int], ServiceEntry] = {}
    listeners = config.messages(naming.LISTENER)
    for name in sorted(listeners):
        lis = listeners[name]
        assert isinstance(lis, listener_pb2.Listener)
        if lis.HasField("api_listener"):
            continue  # for proxyless gRPC clients, not for the node proxy
        sa = lis.address.socket_address
        vip = _ipv4(sa.address, f"listener {lis.name}")
        cname = _listener_cluster(lis, routes)
        if cname is None:
            continue  # its route has not arrived yet: not redirected until it has
        cluster = clusters.get(cname)
        if isinstance(cluster, cluster_pb2.Cluster) and cluster.type == cluster_pb2.Cluster.STATIC:
            backends = _backends(cluster.load_assignment)
        elif isinstance(cluster, cluster_pb2.Cluster):
            backends = backends_by_cluster.get(cluster.eds_cluster_config.service_name or cname, ())
        else:
            backends = ()
        parsed = naming.parse_cluster_name(cname)
        service = f"{parsed[1]}/{parsed[0]}" if parsed else cname
        meta = lis.metadata.filter_metadata.get("nodemesh")
        port_name = meta.fields["port_name"].string_value if meta and "port_name" in meta.fields else ""
        entries[(vip, sa.port_value)] = ServiceEntry(
            id=len(entries) + 1, service=service, port_name=port_name, vip=vip,
            port=sa.port_value, backends=backends)
    return ServiceTable(MappingProxyType(entries))
