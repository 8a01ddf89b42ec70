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
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import api_listener_pb2, listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf import any_pb2, duration_pb2, message, struct_pb2, wrappers_pb2

from controlplane import naming
from controlplane.registry import Endpoint, Registry, Service, ServicePort

TCP_PROXY = "envoy.filters.network.tcp_proxy"
HCM = "envoy.filters.network.http_connection_manager"
ROUTER = "envoy.filters.http.router"
METADATA_KEY = "nodemesh"


def protocol_of(port: ServicePort) -> str:
    """The declared protocol, as Istio reads it: appProtocol, else the port
    name's prefix (``http-web``, ``grpc``); anything else is opaque TCP."""
    declared = (port.app_protocol or port.name.split("-", 1)[0]).lower()
    if declared.startswith("grpc"):
        return "grpc"
    if declared in ("http2", "h2c", "kubernetes.io/h2c"):
        return "http2"
    if declared == "http":
        return "http"
    return "tcp"


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


def _cluster(svc: Service, port: ServicePort, protocol: str) -> cluster_pb2.Cluster:
    name = naming.cluster_name(svc.name, svc.namespace, port.port)
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads(),
                                                                 service_name=name),
        connect_timeout=duration_pb2.Duration(seconds=1),
        lb_policy=cluster_pb2.Cluster.ROUND_ROBIN,
        metadata=_metadata(svc, port, protocol),
    )


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
        http_filters=[hcm_pb2.HttpFilter(name=ROUTER, typed_config=_pack(router_pb2.Router()))])


def _pack(msg: message.Message) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    return a


def _vip_listener(svc: Service, port: ServicePort, protocol: str) -> listener_pb2.Listener:
    assert svc.cluster_ip is not None
    cluster = naming.cluster_name(svc.name, svc.namespace, port.port)
    if protocol == "tcp":
        flt = listener_components_pb2.Filter(name=TCP_PROXY, typed_config=_pack(
            tcp_proxy_pb2.TcpProxy(stat_prefix=cluster, cluster=cluster)))
    else:
        flt = listener_components_pb2.Filter(name=HCM, typed_config=_pack(_hcm(svc, port)))
    return listener_pb2.Listener(
        name=naming.vip_listener_name(svc.cluster_ip, port.port),
        address=_socket(svc.cluster_ip, port.port),
        # Captured by BPF, never bound: the node proxy serves it from 15001.
        bind_to_port=wrappers_pb2.BoolValue(value=False),
        traffic_direction=base_pb2.OUTBOUND,
        filter_chains=[listener_components_pb2.FilterChain(filters=[flt])],
        metadata=_metadata(svc, port, protocol),
    )


def _api_listener(svc: Service, port: ServicePort) -> listener_pb2.Listener:
    return listener_pb2.Listener(
        name=naming.api_listener_name(svc.name, svc.namespace, port.port),
        api_listener=api_listener_pb2.ApiListener(api_listener=_pack(_hcm(svc, port))))


def _route(svc: Service, port: ServicePort) -> route_pb2.RouteConfiguration:
    host = naming.host(svc.name, svc.namespace)
    domains = [host, f"{host}:{port.port}", f"{svc.name}.{svc.namespace}",
               f"{svc.name}.{svc.namespace}:{port.port}", svc.name, f"{svc.name}:{port.port}"]
    if svc.cluster_ip:
        domains += [svc.cluster_ip, f"{svc.cluster_ip}:{port.port}"]
    return route_pb2.RouteConfiguration(
        name=naming.route_name(svc.name, svc.namespace, port.port),
        virtual_hosts=[route_components_pb2.VirtualHost(
            name=f"{host}:{port.port}", domains=domains,
            routes=[route_components_pb2.Route(
                match=route_components_pb2.RouteMatch(prefix="/"),
                route=route_components_pb2.RouteAction(
                    cluster=naming.cluster_name(svc.name, svc.namespace, port.port)))])])


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
            add(naming.CLUSTER, cname, _cluster(svc, port, protocol))
            add(naming.ENDPOINT, cname, _load_assignment(svc, port, endpoints))
            if svc.cluster_ip is not None:
                lis = _vip_listener(svc, port, protocol)
                add(naming.LISTENER, lis.name, lis)
            if protocol != "tcp":
                api = _api_listener(svc, port)
                add(naming.LISTENER, api.name, api)
                route = _route(svc, port)
                add(naming.ROUTE, route.name, route)
    return Snapshot(MappingProxyType({t: MappingProxyType(r) for t, r in out.items()}))
