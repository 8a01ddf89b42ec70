"""Service table construction and round-robin candidate order."""

from __future__ import annotations

from types import MappingProxyType

from agent.xds_state import Record, XdsConfig, to_service_table
from controlplane import naming
from controlplane.registry import Endpoint, EndpointSet, Registry, Service, ServicePort
from controlplane.translate import translate
from dataplane.lb import RoundRobin
from dataplane.services import ServiceTable


def build_service_table(reg: Registry) -> ServiceTable:
    """The table the proxy gets for a registry: through xDS, as in the agent."""
    snap = translate(reg)
    cfg = XdsConfig()
    for t in naming.TYPE_ORDER:
        cfg = cfg.changed(t, [Record(n, r.version, r.packed()) for n, r in snap.of(t).items()], [])
    return to_service_table(cfg)


def ep(ip: str, ready: bool = True, **ports: int) -> Endpoint:
    return Endpoint(ip=ip, ready=ready, ports=MappingProxyType(ports or {"http": 8080}))


def registry(services: list[Service], sets: list[EndpointSet]) -> Registry:
    return Registry(services=MappingProxyType({s.key: s for s in services}),
                    endpoint_sets=tuple(sets))


def test_only_ready_endpoints_become_backends_with_named_target_ports() -> None:
    svc = Service("shop", "web", "198.19.0.10",
                  (ServicePort("http", 80, "http"), ServicePort("admin", 81, 9901)))
    sets = [EndpointSet("shop", "web", "web-1", (ep("10.0.0.1"), ep("10.0.0.2", ready=False))),
            EndpointSet("shop", "web", "web-2", (ep("10.0.0.3"),))]
    table = build_service_table(registry([svc], sets))
    http = table.lookup("198.19.0.10", 80)
    assert http is not None
    assert [b.address for b in http.backends] == ["10.0.0.1:8080", "10.0.0.3:8080"]
    admin = table.lookup("198.19.0.10", 81)
    assert admin is not None  # numeric targetPort used when the slice lacks the name
    assert [b.address for b in admin.backends] == ["10.0.0.1:9901", "10.0.0.3:9901"]
    assert table.bpf_entries().keys() == {("198.19.0.10", 80), ("198.19.0.10", 81)}


def test_headless_and_udp_ports_are_not_mesh_services() -> None:
    headless = Service("shop", "db", None, (ServicePort("pg", 5432, 5432),))
    dns = Service("shop", "dns", "198.19.0.53", (ServicePort("dns", 53, 53, protocol="UDP"),))
    table = build_service_table(registry([headless, dns], []))
    assert table.by_vip == {}


def test_service_without_endpoints_is_kept_with_no_backends() -> None:
    svc = Service("shop", "web", "198.19.0.10", (ServicePort("http", 80, 8080),))
    entry = build_service_table(registry([svc], [])).lookup("198.19.0.10", 80)
    assert entry is not None and entry.backends == ()


def test_round_robin_rotates_and_candidates_cover_every_backend_once() -> None:
    svc = Service("shop", "web", "198.19.0.10", (ServicePort("http", 80, 8080),))
    sets = [EndpointSet("shop", "web", "w", (ep("10.0.0.1"), ep("10.0.0.2"), ep("10.0.0.3")))]
    entry = build_service_table(registry([svc], sets)).lookup("198.19.0.10", 80)
    assert entry is not None
    rr = RoundRobin()
    firsts = [next(rr.candidates(entry)).ip for _ in range(6)]
    assert firsts == ["10.0.0.1", "10.0.0.2", "10.0.0.3"] * 2
    order = [b.ip for b in rr.candidates(entry)]
    assert sorted(order) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    assert list(RoundRobin().candidates(build_service_table(registry([svc], [])).lookup(
        "198.19.0.10", 80))) == []
