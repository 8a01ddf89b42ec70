"""Registry -> Envoy v3 resources (controlplane/translate.py): names, filters
by protocol, endpoints' health and localities, and per-resource versions."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import health_check_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2

from controlplane import naming
from controlplane.registry import Registry, Service, ServicePort
from controlplane.translate import HCM, LOCAL_RATELIMIT, ROUTER, TCP_PROXY, protocol_of, translate
from tests.xds_fixtures import (
    CDS,
    DB,
    EDS,
    LDS,
    RDS,
    WEB,
    endpoints,
    service,
    snapshot,
)

GRPC = service("greeter", "198.19.0.30", ("grpc", 50051, 50051))


def test_resources_are_named_by_the_one_scheme() -> None:
    snap = snapshot(WEB, endpoints(WEB, "198.18.0.10"), DB, endpoints(DB, "198.18.0.20"))
    assert set(snap.of(CDS)) == {"outbound|80||web.shop.svc.cluster.local",
                                 "outbound|5432||db.shop.svc.cluster.local"}
    assert set(snap.of(EDS)) == set(snap.of(CDS))
    assert set(snap.of(LDS)) == {"198.19.0.10_80", "198.19.0.11_5432",
                                 "web.shop.svc.cluster.local:80"}
    assert set(snap.of(RDS)) == {"web.shop.svc.cluster.local:80"}
    assert naming.parse_cluster_name("outbound|80||web.shop.svc.cluster.local") == ("web", "shop", 80)
    for res in (r for t in naming.TYPE_ORDER for r in snap.of(t).values()):
        inner = getattr(res.message, "cluster_name", "") or res.message.name
        assert inner == res.name  # the map key is the resource's own name


def test_protocol_comes_from_app_protocol_then_the_port_name_prefix() -> None:
    def proto(name: str, app: str | None = None) -> str:
        return protocol_of(ServicePort(name=name, port=1, target_port=1, app_protocol=app))

    assert proto("http") == "http" and proto("http-admin") == "http"
    assert proto("grpc") == "grpc" and proto("grpc-web") == "grpc"
    assert proto("http2") == "http2" and proto("x", "kubernetes.io/h2c") == "http2"
    assert proto("tcp-pg") == "tcp" and proto("https") == "tcp" and proto("mysql") == "tcp"
    assert proto("") == "auto" and proto("data") == "auto"  # nothing declared: sniff
    assert proto("http", app="tcp") == "tcp"  # appProtocol wins over the name
    assert proto("data", app="grpc") == "grpc"


def test_undeclared_port_gets_an_http_chain_for_sniffed_http_and_a_tcp_chain() -> None:
    svc = Service("shop", "misc", "198.19.0.40", (ServicePort("", 9000, 9000),))
    reg = Registry(services=MappingProxyType({svc.key: svc}))
    lis = translate(reg).of(LDS)["198.19.0.40_9000"].message
    http, tcp = lis.filter_chains
    assert list(http.filter_chain_match.application_protocols) == ["http/1.1", "h2c"]
    assert http.filters[0].name == HCM and tcp.filters[0].name == TCP_PROXY
    assert not tcp.HasField("filter_chain_match")


def _only_filter(listener: Any) -> Any:
    chains = listener.filter_chains
    assert len(chains) == 1 and len(chains[0].filters) == 1
    return chains[0].filters[0]


def test_opaque_ports_get_tcp_proxy_and_http_and_grpc_ports_get_hcm_with_rds() -> None:
    snap = snapshot(WEB, DB, GRPC)
    db = _only_filter(snap.of(LDS)["198.19.0.11_5432"].message)
    assert db.name == TCP_PROXY
    tcp = tcp_proxy_pb2.TcpProxy()
    assert db.typed_config.Unpack(tcp)
    assert tcp.cluster == "outbound|5432||db.shop.svc.cluster.local"

    for vip, svc, port in (("198.19.0.10_80", "web", 80), ("198.19.0.30_50051", "greeter", 50051)):
        flt = _only_filter(snap.of(LDS)[vip].message)
        assert flt.name == HCM
        hcm = hcm_pb2.HttpConnectionManager()
        assert flt.typed_config.Unpack(hcm)
        assert hcm.rds.route_config_name == f"{svc}.shop.svc.cluster.local:{port}"
        assert hcm.rds.config_source.HasField("ads")
        assert [f.name for f in hcm.http_filters] == [LOCAL_RATELIMIT, ROUTER]  # router last
        assert hcm.http_filters[-1].typed_config.Is(router_pb2.Router.DESCRIPTOR)
        rc = snap.of(RDS)[hcm.rds.route_config_name].message
        vh = rc.virtual_hosts[0]
        assert f"{svc}.shop.svc.cluster.local:{port}" in vh.domains
        assert vh.routes[0].route.cluster == f"outbound|{port}||{svc}.shop.svc.cluster.local"
    assert not snap.of(LDS)["198.19.0.10_80"].message.bind_to_port.value  # captured, never bound


def test_api_listeners_exist_only_for_http_and_grpc_ports() -> None:
    snap = snapshot(WEB, DB, GRPC)
    api = {n for n, r in snap.of(LDS).items() if r.message.HasField("api_listener")}
    assert api == {"web.shop.svc.cluster.local:80", "greeter.shop.svc.cluster.local:50051"}
    assert set(snap.of(RDS)) == api
    hcm = hcm_pb2.HttpConnectionManager()
    assert snap.of(LDS)["greeter.shop.svc.cluster.local:50051"].message.api_listener \
        .api_listener.Unpack(hcm)
    assert hcm.rds.route_config_name == "greeter.shop.svc.cluster.local:50051"


def test_clusters_are_eds_over_ads_with_their_own_name_as_service_name() -> None:
    c = snapshot(WEB).of(CDS)["outbound|80||web.shop.svc.cluster.local"].message
    assert c.type == cluster_pb2.Cluster.EDS
    assert c.eds_cluster_config.eds_config.HasField("ads")
    assert c.eds_cluster_config.service_name == c.name
    assert c.metadata.filter_metadata["nodemesh"]["protocol"] == "http"


def test_not_ready_endpoints_are_unhealthy_and_ready_ones_healthy() -> None:
    snap = snapshot(WEB, endpoints(WEB, "198.18.0.10"),
                    endpoints(WEB, "198.18.0.11", ready=False, name="web-2"))
    cla = snap.of(EDS)["outbound|80||web.shop.svc.cluster.local"].message
    health = {lb.endpoint.address.socket_address.address: lb.health_status
              for loc in cla.endpoints for lb in loc.lb_endpoints}
    assert health == {"198.18.0.10": health_check_pb2.HEALTHY,
                      "198.18.0.11": health_check_pb2.UNHEALTHY}
    ports = {lb.endpoint.address.socket_address.port_value
             for loc in cla.endpoints for lb in loc.lb_endpoints}
    assert ports == {8080}  # the target port, by port name


def test_endpoints_are_grouped_into_localities_by_zone_with_weights() -> None:
    snap = snapshot(WEB, endpoints(WEB, "198.18.0.10", "198.18.0.11", zone="zone-a"),
                    endpoints(WEB, "198.18.0.12", zone="zone-b", name="web-2"),
                    endpoints(WEB, "198.18.0.13", name="web-3"))
    cla = snap.of(EDS)["outbound|80||web.shop.svc.cluster.local"].message
    by_zone = {loc.locality.zone: sorted(lb.endpoint.address.socket_address.address
                                         for lb in loc.lb_endpoints) for loc in cla.endpoints}
    assert by_zone == {"": ["198.18.0.13"], "zone-a": ["198.18.0.10", "198.18.0.11"],
                       "zone-b": ["198.18.0.12"]}
    for loc in cla.endpoints:
        assert loc.load_balancing_weight.value == len(loc.lb_endpoints)
        assert all(lb.load_balancing_weight.value == 1 for lb in loc.lb_endpoints)


def test_per_resource_versions_are_stable_when_an_unrelated_service_changes() -> None:
    before = snapshot(WEB, endpoints(WEB, "198.18.0.10"), DB, endpoints(DB, "198.18.0.20"))
    after = snapshot(WEB, endpoints(WEB, "198.18.0.10"), DB, endpoints(DB, "198.18.0.21"), GRPC)
    again = snapshot(DB, endpoints(DB, "198.18.0.21"), GRPC, WEB, endpoints(WEB, "198.18.0.10"))
    for t in naming.TYPE_ORDER:
        for name, res in before.of(t).items():
            if name == "outbound|5432||db.shop.svc.cluster.local" and t == EDS:
                assert after.of(t)[name].version != res.version  # db's endpoints did change
            else:
                assert after.of(t)[name].version == res.version, (t, name)
        # Deterministic: the same registry in another order gives the same versions.
        assert {n: r.version for n, r in after.of(t).items()} == \
            {n: r.version for n, r in again.of(t).items()}
        assert after.type_version(t) == again.type_version(t)
    assert before.type_version(EDS) != after.type_version(EDS)
    assert before.type_version(CDS) != after.type_version(CDS)  # greeter added
    same = snapshot(WEB, endpoints(WEB, "198.18.0.10"), DB, endpoints(DB, "198.18.0.20"))
    assert all(before.type_version(t) == same.type_version(t) for t in naming.TYPE_ORDER)


def test_udp_ports_are_skipped_and_headless_services_get_no_vip_listener() -> None:
    dns = Service(namespace="shop", name="dns", cluster_ip="198.19.0.53",
                  ports=(ServicePort("dns", 53, 53, protocol="UDP"), ServicePort("dns-tcp", 53, 53)))
    headless = service("stateful", None, ("http", 80, 8080))
    snap = snapshot(dns, headless)
    assert set(snap.of(CDS)) == {"outbound|53||dns.shop.svc.cluster.local",
                                 "outbound|80||stateful.shop.svc.cluster.local"}
    assert set(snap.of(LDS)) == {"198.19.0.53_53", "stateful.shop.svc.cluster.local:80"}
