"""A registry read from a folder of Kubernetes-style YAML (Namespace, Pod,
Service, EndpointSlice, Endpoints, or a List of them).

A file that cannot be read or parsed is reported in one line and keeps its
last good content, so one bad edit never takes down what the rest declares.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from controlplane.errors import ManifestError
from controlplane.gateway_api import parse_policy, parse_route
from controlplane.registry import (
    Endpoint,
    EndpointSet,
    Namespace,
    Pod,
    Registry,
    Service,
    ServicePort,
    frozen_map,
)
from controlplane.traffic import HttpRoute, TrafficPolicy
from nodemesh.errors import UserError

SUFFIXES = (".yaml", ".yml")
# libyaml's loader when PyYAML was built with it (about 8x faster); same safety.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
Objects = tuple[Any, ...]


@dataclass(frozen=True)
class FileProblem:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def _meta(doc: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    meta = doc.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
        raise ManifestError(f"{doc.get('kind')} without metadata.name")
    return meta["name"], str(meta.get("namespace") or "default"), meta


def _labels(meta: dict[str, Any], key: str = "labels") -> dict[str, str]:
    raw = meta.get(key) or {}
    if not isinstance(raw, dict):
        raise ManifestError(f"metadata.{key} of {meta.get('name')} must be a mapping")
    return {str(k): str(v) for k, v in raw.items()}


def _ip(value: Any, what: str) -> str:
    try:
        return str(ipaddress.IPv4Address(str(value)))
    except ValueError:
        raise ManifestError(f"{what} {value!r} is not an IPv4 address") from None


def _any_ip(value: Any, what: str) -> str:
    try:
        return str(ipaddress.ip_address(str(value)))
    except ValueError:
        raise ManifestError(f"{what} {value!r} is not an IP address") from None


def _port(value: Any, what: str) -> int:
    if not isinstance(value, int) or not 0 < value < 65536:
        raise ManifestError(f"{what} {value!r} is not a port number (1-65535)")
    return value


def _service(doc: dict[str, Any]) -> Service:
    name, ns, _ = _meta(doc)
    spec = doc.get("spec") or {}
    cip = spec.get("clusterIP")
    # Any IP family here: whether a consumer can use an IPv6 VIP is its own
    # call (the agent NACKs one today; Envoy would not).
    cluster_ip = None if cip in (None, "", "None") else _any_ip(cip, f"Service {ns}/{name} clusterIP")
    ports = []
    for p in spec.get("ports") or []:
        port = _port(p.get("port"), f"Service {ns}/{name} port")
        target = p.get("targetPort", port)
        if not isinstance(target, str):
            target = _port(target, f"Service {ns}/{name} targetPort")
        ports.append(ServicePort(name=str(p.get("name") or ""), port=port, target_port=target,
                                 protocol=str(p.get("protocol") or "TCP"),
                                 app_protocol=p.get("appProtocol")))
    return Service(namespace=ns, name=name, cluster_ip=cluster_ip, ports=tuple(ports))


def _endpoint_slice(doc: dict[str, Any]) -> EndpointSet:
    name, ns, meta = _meta(doc)
    service = _labels(meta).get("kubernetes.io/service-name")
    if not service:
        raise ManifestError(f"EndpointSlice {ns}/{name} lacks label kubernetes.io/service-name")
    ports = {str(p.get("name") or ""): _port(p.get("port"), f"EndpointSlice {ns}/{name} port")
             for p in doc.get("ports") or []}
    eps = []
    for e in doc.get("endpoints") or []:
        cond = e.get("conditions") or {}
        ready = cond.get("ready", True) is not False
        ref = e.get("targetRef") or {}
        for addr in e.get("addresses") or []:
            eps.append(Endpoint(ip=_ip(addr, f"EndpointSlice {ns}/{name} address"), ready=ready,
                                ports=MappingProxyType(ports), node_name=e.get("nodeName"),
                                zone=e.get("zone"), pod=ref.get("name")))
    return EndpointSet(namespace=ns, service=service, name=name, endpoints=tuple(eps))


def _endpoints(doc: dict[str, Any]) -> EndpointSet:
    name, ns, _ = _meta(doc)
    eps = []
    for subset in doc.get("subsets") or []:
        ports = {str(p.get("name") or ""): _port(p.get("port"), f"Endpoints {ns}/{name} port")
                 for p in subset.get("ports") or []}
        for key, ready in (("addresses", True), ("notReadyAddresses", False)):
            for a in subset.get(key) or []:
                ref = a.get("targetRef") or {}
                eps.append(Endpoint(ip=_ip(a.get("ip"), f"Endpoints {ns}/{name} ip"), ready=ready,
                                    ports=MappingProxyType(ports), node_name=a.get("nodeName"),
                                    pod=ref.get("name")))
    return EndpointSet(namespace=ns, service=name, name=name, endpoints=tuple(eps))


def _pod(doc: dict[str, Any], source: str) -> Pod:
    name, ns, meta = _meta(doc)
    spec = doc.get("spec") or {}
    status = doc.get("status") or {}
    ip = status.get("podIP")
    return Pod(namespace=ns, name=name, labels=frozen_map(_labels(meta)),
               annotations=frozen_map(_labels(meta, "annotations")),
               node_name=spec.get("nodeName"), pod_ip=_ip(ip, f"Pod {ns}/{name} podIP") if ip else None,
               source=source)


def parse_documents(docs: Iterable[Any], source: str) -> Objects:
    out: list[Any] = []
    for doc in docs:
        if doc is None:
            continue
        if not isinstance(doc, dict) or "kind" not in doc:
            raise ManifestError("a document is not a Kubernetes object (no 'kind')")
        kind = doc["kind"]
        if kind == "List":
            out.extend(parse_documents(doc.get("items") or [], source))
        elif kind == "Namespace":
            name, _, meta = _meta(doc)
            out.append(Namespace(name=name, labels=frozen_map(_labels(meta))))
        elif kind == "Pod":
            out.append(_pod(doc, source))
        elif kind == "Service":
            out.append(_service(doc))
        elif kind == "EndpointSlice":
            out.append(_endpoint_slice(doc))
        elif kind == "Endpoints":
            out.append(_endpoints(doc))
        elif kind in ("HTTPRoute", "GRPCRoute"):
            name, ns, _ = _meta(doc)
            out.append(parse_route(doc, ns, name))
        elif kind == "TrafficPolicy":
            name, ns, _ = _meta(doc)
            out.append(parse_policy(doc, ns, name))
        # Other kinds (Deployments, ConfigMaps, ...) are not ours to read.
    return tuple(out)


def parse_file(path: Path) -> Objects:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ManifestError(f"cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ManifestError(f"not UTF-8 text (byte {exc.start})") from None
    try:
        docs = list(yaml.load_all(text, Loader=_LOADER))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ManifestError(f"{where}invalid YAML ({problem})") from None
    except RecursionError:
        raise ManifestError("nested too deeply to be a Kubernetes manifest") from None
    try:
        return parse_documents(docs, str(path))
    except (AttributeError, TypeError, ValueError, RecursionError) as exc:
        raise ManifestError(f"unexpected structure ({type(exc).__name__}: {exc})") from None


def build_registry(objects: Iterable[Any]) -> Registry:
    namespaces: dict[str, Namespace] = {}
    pods: dict[str, Pod] = {}
    services: dict[str, Service] = {}
    sets: list[EndpointSet] = []
    routes: list[HttpRoute] = []
    policies: dict[str, TrafficPolicy] = {}
    for obj in objects:
        if isinstance(obj, Namespace):
            namespaces[obj.name] = obj
        elif isinstance(obj, Pod):
            pods[obj.key] = obj
        elif isinstance(obj, Service):
            services[obj.key] = obj
        elif isinstance(obj, EndpointSet):
            sets.append(obj)
        elif isinstance(obj, HttpRoute):
            routes.append(obj)
        elif isinstance(obj, TrafficPolicy):
            # Two policies for one Service: the first by name wins, as
            # Gateway API policy attachment resolves conflicts.
            cur = policies.get(obj.service_key)
            if cur is None or obj.name < cur.name:
                policies[obj.service_key] = obj
    return Registry(namespaces=MappingProxyType(namespaces), pods=MappingProxyType(pods),
                    services=MappingProxyType(services), endpoint_sets=tuple(sets),
                    routes=tuple(sorted(routes, key=lambda r: r.key)),
                    policies=MappingProxyType(policies))


class YamlDirectorySource:
    """Reads a folder; ``poll()`` re-reads only when a file changed."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise UserError(f"config directory {self.directory} does not exist or is not a folder")
        self._signature: tuple[tuple[str, int, int], ...] | None = None
        self._good: dict[str, Objects] = {}
        self.problems: tuple[FileProblem, ...] = ()
        self.registry = Registry()

    def _scan(self) -> tuple[tuple[str, int, int], ...]:
        sig = []
        try:
            names = sorted(os.listdir(self.directory))
        except OSError as exc:
            raise UserError(f"cannot list config directory {self.directory}: {exc.strerror}") from None
        for name in names:
            if name.endswith(SUFFIXES) and not name.startswith("."):
                try:
                    st = (self.directory / name).stat()
                except FileNotFoundError:
                    continue
                sig.append((name, st.st_mtime_ns, st.st_size))
        return tuple(sig)

    def poll(self) -> bool:
        """Re-read if anything changed; True when the registry may have changed."""
        sig = self._scan()
        if sig == self._signature:
            return False
        before = {name: (mtime, size) for name, mtime, size in self._signature or ()}
        self._signature = sig
        present = {name for name, _, _ in sig}
        for name in list(self._good):
            if name not in present:
                del self._good[name]
        problems = {p.path: p for p in self.problems if Path(p.path).name in present}
        # Only files whose mtime or size moved are parsed again: re-reading a
        # folder of thousands of manifests for each edit took seconds.
        for name, mtime, size in sig:
            if before.get(name) == (mtime, size):
                continue
            path = str(self.directory / name)
            problems.pop(path, None)
            try:
                self._good[name] = parse_file(self.directory / name)
            except ManifestError as exc:
                kept = " (keeping its last good content)" if name in self._good else ""
                problems[path] = FileProblem(path, f"{exc}{kept}")
        self.problems = tuple(problems[k] for k in sorted(problems))
        self.registry = build_registry(o for name in sorted(self._good) for o in self._good[name])
        return True


def check_directory(directory: str | Path) -> list[FileProblem]:
    """Validate every file once (for `nodemesh check-config`)."""
    src = YamlDirectorySource(directory)
    src.poll()
    return list(src.problems)
