"""The agent's side of xDS, sans-IO: what it makes of resources, what it
refuses (and why), and the persisted last good config."""

from __future__ import annotations

from pathlib import Path

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_components_pb2
from google.protobuf import any_pb2, struct_pb2

from agent.config_store import ConfigStore
from agent.xds_state import Record, Rejected, XdsConfig, to_service_table
from controlplane import naming
from controlplane.translate import Snapshot, translate
from controlplane.yaml_source import YamlDirectorySource

MANIFESTS = """
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 198.19.0.10
  ports: [{name: http, port: 80, targetPort: 8080}, {name: tcp-echo, port: 7, targetPort: 7007}]
---
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
ports: [{name: http, port: 8080}, {name: tcp-echo, port: 7007}]
endpoints:
- {addresses: [198.18.0.12], zone: a}
- {addresses: [198.18.0.13], zone: b}
- {addresses: [198.18.0.14], conditions: {ready: false}}
---
kind: Service
metadata: {name: db, namespace: shop}
spec: {clusterIP: 198.19.0.20, ports: [{port: 5432}]}
"""


def registry(tmp_path: Path, text: str = MANIFESTS):  # type: ignore[no-untyped-def]
    (tmp_path / "m.yaml").write_text(text)
    src = YamlDirectorySource(tmp_path)
    src.poll()
    assert src.problems == ()
    return src.registry


def as_config(snap: Snapshot) -> XdsConfig:
    cfg = XdsConfig()
    for t in naming.TYPE_ORDER:
        cfg = cfg.changed(t, [Record(n, r.version, r.packed()) for n, r in snap.of(t).items()], [])
    return cfg


def test_xds_path_gives_the_table_the_registry_describes(tmp_path: Path) -> None:
    via_xds = to_service_table(as_config(translate(registry(tmp_path))))
    assert {k: (e.service, sorted(b.address for b in e.backends))
            for k, e in via_xds.by_vip.items()} == {
        ("198.19.0.10", 80): ("shop/web", ["198.18.0.12:8080", "198.18.0.13:8080"]),  # ready only
        ("198.19.0.10", 7): ("shop/web", ["198.18.0.12:7007", "198.18.0.13:7007"]),
        ("198.19.0.20", 5432): ("shop/db", []),
    }


def test_listener_waits_for_its_route(tmp_path: Path) -> None:
    cfg = as_config(translate(registry(tmp_path)))
    no_routes = cfg.changed(naming.ROUTE, [], set(cfg.of(naming.ROUTE)))
    table = to_service_table(no_routes)
    assert ("198.19.0.10", 80) not in table.by_vip  # HTTP port: needs its RDS route
    assert ("198.19.0.10", 7) in table.by_vip  # tcp_proxy: complete on its own


def test_subscriptions_follow_clusters_and_listeners(tmp_path: Path) -> None:
    cfg = as_config(translate(registry(tmp_path)))
    assert cfg.eds_names() == set(cfg.of(naming.CLUSTER))
    # The HTTP port, and the db port that declares nothing (sniffed: it may be HTTP).
    assert cfg.rds_names() == {"web.shop.svc.cluster.local:80", "db.shop.svc.cluster.local:5432"}


def _with_listener_change(cfg: XdsConfig, name: str, mutate) -> XdsConfig:  # type: ignore[no-untyped-def]
    lis = cfg.messages(naming.LISTENER)[name]
    mutate(lis)
    packed = any_pb2.Any()
    packed.Pack(lis)
    return cfg.changed(naming.LISTENER, [Record(name, "bad", packed)], [])


def test_ipv6_vip_is_rejected_with_a_reason(tmp_path: Path) -> None:
    cfg = as_config(translate(registry(tmp_path)))

    def v6(lis) -> None:  # type: ignore[no-untyped-def]
        lis.address.socket_address.address = "fd00::10"

    with pytest.raises(Rejected, match="IPv6"):
        to_service_table(_with_listener_change(cfg, "198.19.0.10_7", v6))


def test_unknown_filter_is_rejected(tmp_path: Path) -> None:
    cfg = as_config(translate(registry(tmp_path)))

    def other(lis) -> None:  # type: ignore[no-untyped-def]
        del lis.filter_chains[0].filters[:]
        f = listener_components_pb2.Filter(name="envoy.filters.network.redis_proxy")
        f.typed_config.Pack(struct_pb2.Struct())
        lis.filter_chains[0].filters.append(f)

    with pytest.raises(Rejected, match="redis_proxy.*not supported"):
        to_service_table(_with_listener_change(cfg, "198.19.0.10_7", other))


def test_dns_cluster_is_rejected(tmp_path: Path) -> None:
    cfg = as_config(translate(registry(tmp_path)))
    name = "outbound|7||web.shop.svc.cluster.local"
    c = cfg.messages(naming.CLUSTER)[name]
    assert isinstance(c, cluster_pb2.Cluster)
    c.type = cluster_pb2.Cluster.STRICT_DNS
    packed = any_pb2.Any()
    packed.Pack(c)
    with pytest.raises(Rejected, match="STRICT_DNS is not supported"):
        to_service_table(cfg.changed(naming.CLUSTER, [Record(name, "x", packed)], []))


def test_wrong_type_in_a_response_is_rejected(tmp_path: Path) -> None:
    cfg = as_config(translate(registry(tmp_path)))
    cluster = next(iter(cfg.of(naming.CLUSTER).values()))
    with pytest.raises(Rejected, match="carried a"):
        to_service_table(cfg.changed(naming.LISTENER, [Record("x", "1", cluster.resource)], []))


def test_store_round_trip_and_corrupt_file(tmp_path: Path) -> None:
    cfg = as_config(translate(registry(tmp_path))).replaced(naming.CLUSTER, [], "v7")
    cfg = cfg.changed(naming.CLUSTER, as_config(translate(registry(tmp_path))).of(
        naming.CLUSTER).values(), [])
    store = ConfigStore(tmp_path / "state" / "xds-config.json")
    store.save(cfg)
    back = store.load()
    assert back is not None
    assert back.version_info == cfg.version_info
    for t in naming.TYPE_ORDER:
        assert {n: (r.version, r.resource.SerializeToString()) for n, r in back.of(t).items()} == \
            {n: (r.version, r.resource.SerializeToString()) for n, r in cfg.of(t).items()}
    store.path.write_text("{not json")
    assert store.load() is None
    store.remove()
    assert store.load() is None
