"""The YAML folder source: parsing, per-file problems, last good content."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from controlplane.yaml_source import ManifestError, YamlDirectorySource, parse_file
from nodemesh.errors import UserError

NS = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {nodemesh.io/mesh: enabled}}
"""
SVC = """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 198.19.0.10
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [198.18.0.12]
  conditions: {ready: true}
  targetRef: {kind: Pod, name: web-0}
- addresses: [198.18.0.13]
  conditions: {ready: false}
"""
ENDPOINTS_V1 = """
apiVersion: v1
kind: Endpoints
metadata: {name: api, namespace: shop}
subsets:
- addresses: [{ip: 198.18.0.20}]
  notReadyAddresses: [{ip: 198.18.0.21}]
  ports: [{name: grpc, port: 9000}]
"""


def write(d: Path, name: str, text: str) -> Path:
    p = d / name
    p.write_text(text)
    return p


def test_reads_namespaces_services_and_endpoint_slices(tmp_path: Path) -> None:
    write(tmp_path, "ns.yaml", NS)
    write(tmp_path, "svc.yaml", SVC)
    write(tmp_path, "eps.yml", ENDPOINTS_V1)
    write(tmp_path, "notes.txt", "ignored: not yaml suffix")
    src = YamlDirectorySource(tmp_path)
    assert src.poll() is True
    reg = src.registry
    assert reg.namespaces["shop"].labels["nodemesh.io/mesh"] == "enabled"
    svc = reg.services["shop/web"]
    assert svc.cluster_ip == "198.19.0.10" and svc.ports[0].target_port == 8080
    eps = reg.endpoints_of(svc)
    assert [(e.ip, e.ready, e.pod) for e in eps] == [("198.18.0.12", True, "web-0"),
                                                      ("198.18.0.13", False, None)]
    api = [es for es in reg.endpoint_sets if es.service == "api"][0]
    assert [(e.ip, e.ready, dict(e.ports)) for e in api.endpoints] == [
        ("198.18.0.20", True, {"grpc": 9000}), ("198.18.0.21", False, {"grpc": 9000})]
    assert src.problems == ()


def test_poll_rereads_only_on_change(tmp_path: Path) -> None:
    p = write(tmp_path, "ns.yaml", NS)
    src = YamlDirectorySource(tmp_path)
    assert src.poll() is True
    assert src.poll() is False
    p.write_text(NS.replace("enabled", "disabled") + "\n")
    assert src.poll() is True
    assert src.registry.namespaces["shop"].labels["nodemesh.io/mesh"] == "disabled"
    p.unlink()
    assert src.poll() is True
    assert "shop" not in src.registry.namespaces


def test_malformed_file_is_one_problem_and_others_still_load(tmp_path: Path) -> None:
    write(tmp_path, "ns.yaml", NS)
    write(tmp_path, "bad.yaml", "kind: Service\nmetadata: {name: [oops\n")
    src = YamlDirectorySource(tmp_path)
    src.poll()
    assert "shop" in src.registry.namespaces
    assert len(src.problems) == 1
    msg = str(src.problems[0])
    assert "bad.yaml" in msg and "line" in msg and "\n" not in msg


def test_bad_edit_keeps_the_files_last_good_content(tmp_path: Path) -> None:
    p = write(tmp_path, "svc.yaml", SVC)
    src = YamlDirectorySource(tmp_path)
    src.poll()
    p.write_text(SVC.replace("198.19.0.10", "not-an-ip"))
    os.utime(p, ns=(1, 1))  # make sure the change is seen even within one mtime tick
    src.poll()
    assert src.registry.services["shop/web"].cluster_ip == "198.19.0.10"
    assert "keeping its last good content" in str(src.problems[0])
    assert "not-an-ip" in str(src.problems[0])


@pytest.mark.parametrize("text,needle", [
    ("- just\n- a list\n", "no 'kind'"),
    ("kind: Pod\nmetadata: {namespace: x}\n", "metadata.name"),
    ("kind: Service\nmetadata: {name: s}\nspec: {clusterIP: 198.19.0.1, ports: [{port: 70000}]}\n",
     "not a port"),
    ("kind: EndpointSlice\nmetadata: {name: e}\nendpoints: []\n", "kubernetes.io/service-name"),
    ("kind: Pod\nmetadata: {name: p}\nstatus: {podIP: 300.1.1.1}\n", "not an IPv4"),
])
def test_invalid_objects_are_explained(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ManifestError, match=needle):
        parse_file(write(tmp_path, "x.yaml", text))


def test_missing_directory_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        YamlDirectorySource(tmp_path / "nope")


def test_list_kind_and_unknown_kinds(tmp_path: Path) -> None:
    write(tmp_path, "list.yaml", """
kind: List
items:
- {kind: Namespace, metadata: {name: a}}
- {kind: Deployment, metadata: {name: ignored}}
""")
    src = YamlDirectorySource(tmp_path)
    src.poll()
    assert list(src.registry.namespaces) == ["a"] and src.problems == ()


def test_binary_and_absurdly_nested_files_are_problems_not_crashes(tmp_path: Path) -> None:
    write(tmp_path, "ns.yaml", NS)
    (tmp_path / "binary.yaml").write_bytes(b"kind: Pod\n\xff\xfe\x00garbage")
    write(tmp_path, "deep.yaml", "[" * 5000)
    src = YamlDirectorySource(tmp_path)
    src.poll()
    assert "shop" in src.registry.namespaces
    msgs = sorted(str(p) for p in src.problems)
    assert len(msgs) == 2
    assert "binary.yaml" in msgs[0] and "UTF-8" in msgs[0]
    assert "deep.yaml" in msgs[1]
