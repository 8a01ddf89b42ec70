"""Kubernetes-style YAML for sandbox objects, one file per object, so that a
test or the demo can add, change and remove objects the way an operator would
edit a manifest folder."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from controlplane.registry import MESH_LABEL, NETNS_ANNOTATION
from sandbox.node import Pod


class ManifestDir:
    def __init__(self, path: Path, node_name: str) -> None:
        self.path = path
        self.node_name = node_name
        path.mkdir(parents=True, exist_ok=True)

    def write(self, filename: str, docs: Sequence[dict[str, Any]] | dict[str, Any]) -> Path:
        """Write atomically (rename), as config management tools do."""
        if isinstance(docs, dict):
            docs = [docs]
        target = self.path / filename
        tmp = self.path / f".{filename}.tmp"
        tmp.write_text(yaml.safe_dump_all(list(docs), sort_keys=False))
        os.replace(tmp, target)
        return target

    def remove(self, filename: str) -> None:
        (self.path / filename).unlink(missing_ok=True)

    def namespace(self, name: str, mesh: bool) -> Path:
        labels = {MESH_LABEL: "enabled"} if mesh else {}
        return self.write(f"ns-{name}.yaml", {"apiVersion": "v1", "kind": "Namespace",
                                              "metadata": {"name": name, "labels": labels}})

    def pod(self, pod: Pod, node_name: str | None = None) -> Path:
        doc = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod.name, "namespace": pod.namespace, "labels": pod.labels,
                         "annotations": {NETNS_ANNOTATION: pod.netns_path}},
            "spec": {"nodeName": node_name or self.node_name,
                     "containers": [{"name": "app", "image": "sandbox"}]},
            "status": {"phase": "Running", "podIP": pod.ip},
        }
        return self.write(f"pod-{pod.namespace}-{pod.name}.yaml", doc)

    def service(self, namespace: str, name: str, vip: str,
                ports: Sequence[tuple[str, int, int]]) -> Path:
        doc = {
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"clusterIP": vip, "ports": [
                {"name": pname, "port": port, "targetPort": target, "protocol": "TCP"}
                for pname, port, target in ports]},
        }
        return self.write(f"svc-{namespace}-{name}.yaml", doc)

    def endpoint_slice(self, namespace: str, service: str, pods: Sequence[Pod],
                       ports: Sequence[tuple[str, int]], ready: bool = True) -> Path:
        doc = {
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{service}-1", "namespace": namespace,
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4",
            "ports": [{"name": n, "port": p, "protocol": "TCP"} for n, p in ports],
            "endpoints": [{"addresses": [p.ip], "conditions": {"ready": ready},
                           "nodeName": self.node_name,
                           "targetRef": {"kind": "Pod", "name": p.name, "namespace": p.namespace}}
                          for p in pods],
        }
        return self.write(f"eps-{namespace}-{service}.yaml", doc)
