"""Feeding the proxy's request and connection records into Istio-style
telemetry: who the peers are (from the node's registry), and which service
a cluster stands for."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import lru_cache

from controlplane import naming
from controlplane.registry import Registry
from dataplane.flows import Flow
from dataplane.http1_proxy import RequestRecord
from dataplane.telemetry import (
    Header,
    Peer,
    Telemetry,
    ensure_request_id,
    propagate_traceparent,
)


def request_headers(headers: list[Header]) -> tuple[list[Header], str | None, str | None]:
    """x-request-id added where absent; traceparent kept when valid, dropped when not."""
    headers, request_id = ensure_request_id(headers)
    headers, traceparent = propagate_traceparent(headers)
    return headers, request_id, traceparent


class TelemetryGlue:
    def __init__(self, telemetry: Telemetry, registry: Callable[[], Registry]) -> None:
        self.telemetry = telemetry
        self._registry = registry
        # Source peers by pod, for the registry they were read from: every
        # connection needs one, and a new registry (a reload) replaces the lot.
        self._sources: dict[str, Peer] = {}
        self._sources_of: Registry | None = None

    def _source(self, pod_key: str) -> Peer:
        registry = self._registry()
        if registry is not self._sources_of:
            self._sources, self._sources_of = {}, registry
        peer = self._sources.get(pod_key)
        if peer is None:
            ns, _, name = pod_key.partition("/")
            pod = registry.pods.get(pod_key)
            peer = self._sources[pod_key] = Peer.from_pod_labels(name, ns, pod.labels if pod else {})
        return peer

    def on_request(self, rec: RequestRecord) -> None:
        dest, host = _destination_of(rec.cluster)
        grpc = rec.grpc_status
        self.telemetry.request(
            self._source(rec.pod), dest, host,
            request_protocol="grpc" if grpc is not None else "http",
            response_code=rec.status, grpc_response_status=grpc,
            response_flags=rec.response_flags, duration_s=time.monotonic() - rec.started,
            request_bytes=rec.request_bytes, response_bytes=rec.response_bytes,
            method=rec.method, path=rec.path, authority=rec.authority, upstream=rec.upstream,
            request_id=rec.request_id, traceparent=rec.traceparent, upstream_cluster=rec.cluster,
            downstream=rec.pod_ip, start_time=rec.started_wall,
            protocol=rec.protocol)

    def on_tcp_open(self, flow: Flow, cluster: str | None) -> None:
        dest, host = _destination_of(cluster)
        flow.meta = self.telemetry.tcp_opened(self._source(flow.pod), dest, host,
                                              upstream=flow.endpoint, downstream=flow.pod_ip,
                                              upstream_cluster=cluster)

    def on_tcp_close(self, flow: Flow) -> None:
        if flow.meta is None:
            return
        # Istio's direction: "sent" is toward the client.
        self.telemetry.tcp_closed(flow.meta, sent=flow.bytes_received, received=flow.bytes_sent,
                                  duration_s=time.monotonic() - flow.started,
                                  upstream=flow.endpoint)


@lru_cache(maxsize=1024)
def _destination_of(cluster: str | None) -> tuple[Peer, str]:
    """The destination peer and service host a cluster name stands for (cached:
    the same few clusters serve every connection)."""
    parsed = naming.parse_cluster_name(cluster) if cluster else None
    if parsed is None:
        return Peer(), "unknown"
    service, ns, _ = parsed
    return Peer(workload=service, namespace=ns, app=service), naming.host(service, ns)
