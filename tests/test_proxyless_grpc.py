"""Proxyless gRPC: a client in a sandbox pod, using grpcio's own xDS resolver
and a bootstrap that points at our control plane, resolves
``xds:///<service>.<namespace>.svc.cluster.local:<port>`` and calls the
service's pods directly, balanced across them; an edit of the YAML folder
changes where new calls go. No agent and no BPF are involved: the
configuration alone does it. Needs root (netns, cgroups)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox.manifests import ManifestDir
from sandbox.node import POD_NET, Pod, Sandbox, stop_processes

pytestmark = pytest.mark.root

PY = sys.executable
NODE_NAME = "node-1"
XDS_ADDRESS = f"{POD_NET[1]}:15010"  # the node's bridge address: reachable from every pod
SERVICE, NAMESPACE, VIP, PORT, TARGET = "greeter", "shop", "198.19.0.30", 50051, 50061
TARGET_URI = f"xds:///{SERVICE}.{NAMESPACE}.svc.cluster.local:{PORT}"
PROXY_VARS = ("http_proxy", "https_proxy", "grpc_proxy", "no_proxy", "all_proxy")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.lower() not in PROXY_VARS}
    env.update(extra)
    return env


def _wait_for_line(log: Path, proc: subprocess.Popen[Any], needle: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text() if log.exists() else ""
        for line in text.splitlines():
            if needle in line:
                return line
        if proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode} before {needle!r}:\n{text}")
        time.sleep(0.05)
    raise AssertionError(f"no {needle!r} within {timeout}s:\n{log.read_text()}")


class World:
    def __init__(self, sb: Sandbox, work: Path) -> None:
        self.sb = sb
        self.work = work
        self.manifests = ManifestDir(work / "manifests", NODE_NAME)
        self.servers: list[Pod] = []
        self.client: Pod
        self.control_plane: subprocess.Popen[Any]
        self.cp_log = work / "control-plane.log"
        self.bootstrap = work / "bootstrap.json"

    def build(self) -> World:
        m = self.manifests
        m.namespace(NAMESPACE, mesh=False)
        self.servers = [self.sb.add_pod(f"greeter-{i}", NAMESPACE, {"app": SERVICE})
                        for i in range(2)]
        self.client = self.sb.add_pod("client", NAMESPACE)
        for pod in (*self.servers, self.client):
            m.pod(pod)
        for pod in self.servers:
            proc = pod.spawn([PY, "-m", "sandbox.grpc_apps", "server", "--port", str(TARGET),
                              "--name", pod.name], stdout=subprocess.PIPE, text=True, env=_env())
            assert proc.stdout is not None
            assert json.loads(proc.stdout.readline())["listening"] == TARGET
        m.service(NAMESPACE, SERVICE, VIP, [("grpc", PORT, TARGET)])
        m.endpoint_slice(NAMESPACE, SERVICE, self.servers, [("grpc", TARGET)])
        assert self.sb.node is not None
        with open(self.cp_log, "w") as log:
            self.control_plane = self.sb.node.spawn(
                [PY, "-m", "controlplane.service", "--config-dir", str(m.path),
                 "--listen", XDS_ADDRESS], stdout=log, stderr=subprocess.STDOUT, env=_env())
        _wait_for_line(self.cp_log, self.control_plane, "serving xDS", 30)
        self.bootstrap.write_text(json.dumps({
            "xds_servers": [{"server_uri": XDS_ADDRESS, "channel_creds": [{"type": "insecure"}],
                             "server_features": ["xds_v3"]}],
            "node": {"id": f"proxyless~{self.client.ip}~client.{NAMESPACE}",
                     "cluster": "proxyless", "locality": {"zone": ""}}}))
        return self

    def call(self, calls: int) -> dict[str, Any]:
        res = self.client.run(
            [PY, "-m", "sandbox.grpc_apps", "client", "--target", TARGET_URI,
             "--calls", str(calls), "--timeout", "20"],
            timeout=90, env=_env(GRPC_XDS_BOOTSTRAP=str(self.bootstrap)))
        lines = res.stdout.strip().splitlines()
        assert lines, f"client printed nothing (exit {res.returncode}):\n{res.stderr}"
        return dict(json.loads(lines[-1]), stderr=res.stderr, returncode=res.returncode)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with Sandbox() as sb:
        yield World(sb, tmp_path).build()


def test_grpc_xds_resolver_calls_a_mesh_service_through_our_control_plane(world: World) -> None:
    out = world.call(8)
    assert out["returncode"] == 0 and out["ok"] == 8, out
    # Balanced by grpcio itself across the endpoints our EDS named...
    assert out["servers"] == ["greeter-0", "greeter-1"], out
    # ...and straight from the client pod to the server pods: no proxy, no VIP.
    peers = {r["peer"].rsplit(":", 1)[0] for r in out["results"]}
    assert peers == {f"ipv4:{world.client.ip}"}, out

    # An edit of the folder reaches the next resolution: only greeter-1 is left.
    world.manifests.endpoint_slice(NAMESPACE, SERVICE, world.servers[1:], [("grpc", TARGET)])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if "config generation 2" in world.cp_log.read_text():
            break
        time.sleep(0.05)
    out = world.call(4)
    assert out["ok"] == 4 and out["servers"] == ["greeter-1"], out

    log = world.cp_log.read_text()
    assert "NACK" not in log, log  # grpcio accepted every resource we sent
    assert "opened by node 'proxyless~" in log
    stop_processes([world.control_plane])
    assert world.control_plane.returncode == 0, log
