"""agent/telemetry_glue.py (no root): the peers an L4 connection is reported
with come from the node's registry as it is now, cached per registry."""

from __future__ import annotations

from agent.telemetry_glue import TelemetryGlue
from controlplane import naming
from controlplane.registry import Pod, Registry, frozen_map
from dataplane.flows import FlowTable
from dataplane.telemetry import Telemetry


def _registry(app: str) -> Registry:
    pod = Pod("shop", "client", frozen_map({"app": app, "version": "v2"}), frozen_map({}),
              "node-1", "198.18.0.10", "pods.yaml")
    return Registry(pods=frozen_map({pod.key: pod}))  # type: ignore[arg-type]


def test_source_labels_follow_a_reloaded_registry() -> None:
    current = {"registry": _registry("client")}
    glue = TelemetryGlue(Telemetry(access_log=lambda line: None), lambda: current["registry"])
    flows = FlowTable(on_close=glue.on_tcp_close)
    cluster = naming.cluster_name("web", "shop", 80)

    def source_app() -> tuple[str, str]:
        flow = flows.open(pod="shop/client", pod_ip="198.18.0.10", client="198.18.0.10:40000",
                          original_dst="198.19.0.10:80")
        glue.on_tcp_open(flow, cluster)
        flows.close(flow)
        return flow.meta.source.app, flow.meta.destination.workload

    assert source_app() == ("client", "web")
    assert source_app() == ("client", "web")  # cached, same answer
    current["registry"] = _registry("renamed")  # a reload: a new registry object
    assert source_app() == ("renamed", "web")
    current["registry"] = Registry()  # the pod is gone from the registry
    assert source_app() == ("client", "web")  # the workload name stands in for app


def test_unknown_clusters_get_unknown_destinations() -> None:
    glue = TelemetryGlue(Telemetry(access_log=lambda line: None), Registry)
    flows = FlowTable(on_close=glue.on_tcp_close)
    flow = flows.open(pod="shop/client", pod_ip=None, client="x", original_dst="y")
    glue.on_tcp_open(flow, None)
    assert flow.meta.destination_service == "unknown"
    glue.on_tcp_open(flow, "not|a|cluster")
    assert flow.meta.destination_service == "unknown"
