"""The service table the proxy routes by: VIP:port -> the ready backends.

Built from a registry snapshot as one immutable value and swapped in whole,
so a connection never sees half an update.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from controlplane.registry import Endpoint, Registry, ServicePort


@dataclass(frozen=True)
class Backend:
    ip: str
    port: int
    pod: str | None = None

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"


@dataclass(frozen=True)
class ServiceEntry:
    id: int
    service: str  # namespace/name
    port_name: str
    vip: str
    port: int
    backends: tuple[Backend, ...]


@dataclass(frozen=True)
class ServiceTable:
    by_vip: Mapping[tuple[str, int], ServiceEntry] = field(
        default_factory=lambda: MappingProxyType({}))

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
