"""The service table the proxy routes by: VIP:port -> the ready backends.

Built from a registry snapshot as one immutable value and swapped in whole,
so a connection never sees half an update.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from controlplane.registry import Endpoint, Registry, ServicePort
from dataplane.backend import Backend
from dataplane.balancers import LeastRequestConfig, RingHashConfig
from dataplane.policy.circuit_breaker import CircuitBreakerConfig
from dataplane.policy.outlier import OutlierConfig
from dataplane.routing import RouteTable


@dataclass(frozen=True)
class ClusterConfig:
    """One upstream cluster as the proxy uses it: backends and their policies."""

    name: str
    service: str
    backends: tuple[Backend, ...] = ()
    lb_policy: str = "ROUND_ROBIN"  # Envoy's enum spelling
    least_request: LeastRequestConfig | None = None
    ring_hash: RingHashConfig | None = None
    circuit_breaker: CircuitBreakerConfig = field(default_factory=CircuitBreakerConfig)
    outlier: OutlierConfig | None = None

    def policy_key(self) -> tuple[object, ...]:
        """What, when changed, means the runtime state must start over."""
        return (self.lb_policy, self.least_request, self.ring_hash, self.circuit_breaker,
                self.outlier)


@dataclass(frozen=True)
class ServiceEntry:
    id: int
    service: str  # namespace/name
    port_name: str
    vip: str
    port: int
    backends: tuple[Backend, ...]
    protocol: str = "tcp"  # tcp | http | http2 | grpc | auto (sniff)
    cluster: str | None = None  # where opaque (tcp) traffic goes
    routes: RouteTable | None = None  # for HTTP traffic


@dataclass(frozen=True)
class ServiceTable:
    by_vip: Mapping[tuple[str, int], ServiceEntry] = field(
        default_factory=lambda: MappingProxyType({}))
    clusters: Mapping[str, ClusterConfig] = field(default_factory=lambda: MappingProxyType({}))

    def lookup(self, ip: str, port: int) -> ServiceEntry | None:
        return self.by_vip.get((ip, port))

    def bpf_entries(self) -> dict[tuple[str, int], int]:
        return {k: e.id for k, e in self.by_vip.items()}


def _backend_port(sp: ServicePort, ep: Endpoint) -> int | None:
    if sp.name in ep.ports:
        return ep.ports[sp.name]
    if len(ep.ports) == 1 and sp.name == "":
        return next(iter(ep.ports.values()))
    if isinstance(sp.target_port, int):
        return sp.target_port
    return None  # a named targetPort that the endpoint does not carry


def build_service_table(registry: Registry) -> ServiceTable:
    entries: dict[tuple[str, int], ServiceEntry] = {}
    for key in sorted(registry.services):
        svc = registry.services[key]
        if svc.cluster_ip is None:
            continue  # headless: clients connect to endpoints directly
        endpoints = registry.endpoints_of(svc)
        for sp in svc.ports:
            if sp.protocol.upper() != "TCP":
                continue
            backends = []
            seen = set()
            for ep in endpoints:
                port = _backend_port(sp, ep)
                if not ep.ready or port is None or (ep.ip, port) in seen:
                    continue
                seen.add((ep.ip, port))
                backends.append(Backend(ep.ip, port, ep.pod))
            entries[(svc.cluster_ip, sp.port)] = ServiceEntry(
                id=len(entries) + 1, service=svc.key, port_name=sp.name, vip=svc.cluster_ip,
                port=sp.port, backends=tuple(backends))
    return ServiceTable(MappingProxyType(entries))
