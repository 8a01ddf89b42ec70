"""The registry model: namespaces, pods, services and their endpoints, as
immutable values. Every source (a YAML folder today; the Kubernetes API and
other registries later) produces one ``Registry`` snapshot; consumers diff
snapshots rather than receiving events."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from controlplane.traffic import HttpRoute, TrafficPolicy

MESH_LABEL = "nodemesh.io/mesh"
NETNS_ANNOTATION = "nodemesh.io/netns"


def frozen_map(d: Mapping[str, str] | None) -> Mapping[str, str]:
    return MappingProxyType(dict(d or {}))


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: Mapping[str, str] = field(default_factory=lambda: frozen_map({}))


@dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    node_name: str | None
    pod_ip: str | None
    source: str  # the file it came from, for error messages

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def netns_path(self) -> str | None:
        """Where the pod's network namespace is. A CNI-fed source would fill this
        from the CNI ADD call; the YAML source reads an annotation."""
        return self.annotations.get(NETNS_ANNOTATION)


@dataclass(frozen=True)
class ServicePort:
    name: str
    port: int
    target_port: int | str
    protocol: str = "TCP"
    app_protocol: str | None = None


@dataclass(frozen=True)
class Service:
    namespace: str
    name: str
    cluster_ip: str | None
    ports: tuple[ServicePort, ...]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Endpoint:
    ip: str
    ready: bool
    ports: Mapping[str, int]  # port name ("" when unnamed) -> port
    node_name: str | None = None
    zone: str | None = None
    pod: str | None = None  # target pod name, when known


@dataclass(frozen=True)
class EndpointSet:
    """One EndpointSlice or one Endpoints object."""

    namespace: str
    service: str
    name: str
    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True)
class Registry:
    namespaces: Mapping[str, Namespace] = field(default_factory=lambda: MappingProxyType({}))
    pods: Mapping[str, Pod] = field(default_factory=lambda: MappingProxyType({}))
    services: Mapping[str, Service] = field(default_factory=lambda: MappingProxyType({}))
    endpoint_sets: tuple[EndpointSet, ...] = ()
    routes: tuple[HttpRoute, ...] = ()  # HTTPRoute/GRPCRoute attached to Services
    policies: Mapping[str, TrafficPolicy] = field(default_factory=lambda: MappingProxyType({}))

    def routes_for(self, service: Service, port: int) -> list[HttpRoute]:
        """The routes attached to one port of a service (a parentRef without a port
        attaches to all of them)."""
        return [r for r in self.routes
                if any(p.namespace == service.namespace and p.service == service.name
                       and p.port in (None, port) for p in r.parents)]

    def endpoints_of(self, service: Service) -> tuple[Endpoint, ...]:
        out: list[Endpoint] = []
        for es in self.endpoint_sets:
            if es.namespace == service.namespace and es.service == service.name:
                out.extend(es.endpoints)
        return tuple(out)
