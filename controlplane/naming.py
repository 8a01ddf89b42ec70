"""The one naming scheme for xDS resources (Istio-compatible, so operators
and tools that know Istio's names read ours):

  Cluster / ClusterLoadAssignment   outbound|<port>||<service>.<namespace>.svc.cluster.local
  Listener (node proxy, by VIP)     <vip>_<port>                   e.g. 198.19.0.10_80
  Listener (proxyless gRPC, API)    <service>.<namespace>.svc.cluster.local:<port>
  RouteConfiguration                <service>.<namespace>.svc.cluster.local:<port>
"""

from __future__ import annotations

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"

# Make-before-break: a client learns clusters and their endpoints before the
# listeners and routes that point at them.
TYPE_ORDER = (CLUSTER, ENDPOINT, LISTENER, ROUTE)
SHORT = {CLUSTER: "clusters", ENDPOINT: "endpoints", LISTENER: "listeners", ROUTE: "routes"}

DOMAIN = "svc.cluster.local"


def host(service: str, namespace: str) -> str:
    return f"{service}.{namespace}.{DOMAIN}"


def cluster_name(service: str, namespace: str, port: int) -> str:
    return f"outbound|{port}||{host(service, namespace)}"


def parse_cluster_name(name: str) -> tuple[str, str, int] | None:
    """(service, namespace, port) of a cluster named by this scheme, else None."""
    parts = name.split("|")
    if len(parts) != 4 or parts[0] != "outbound" or not parts[1].isdigit():
        return None
    labels = parts[3].split(".")
    if len(labels) < 3 or ".".join(labels[2:]) != DOMAIN:
        return None
    return labels[0], labels[1], int(parts[1])


def vip_listener_name(vip: str, port: int) -> str:
    return f"{vip}_{port}"


def api_listener_name(service: str, namespace: str, port: int) -> str:
    return f"{host(service, namespace)}:{port}"


def route_name(service: str, namespace: str, port: int) -> str:
    return f"{host(service, namespace)}:{port}"
