"""The service table the proxy routes by: VIP:port -> the ready backends.

Built by the agent from xDS (agent/xds_state.py) as one immutable value and swapped in whole,
so a connection never sees half an update.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

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
