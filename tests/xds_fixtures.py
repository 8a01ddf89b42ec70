"""Registries built in a line, and an in-process ADS server with scripted
clients, for the control plane's unit tests (no root, 127.0.0.1 only)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from types import MappingProxyType
from typing import Any, TypeVar

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from controlplane import naming
from controlplane.cache import SnapshotCache
from controlplane.registry import Endpoint, EndpointSet, Namespace, Registry, Service, ServicePort
from controlplane.server import add_to_server
from controlplane.translate import Snapshot, translate

CDS, EDS, LDS, RDS = naming.CLUSTER, naming.ENDPOINT, naming.LISTENER, naming.ROUTE
T = TypeVar("T")


# -- registries ---------------------------------------------------------------------

def service(name: str, vip: str | None, *ports: tuple[str, int, int], ns: str = "shop",
            app_protocol: str | None = None) -> Service:
    return Service(namespace=ns, name=name, cluster_ip=vip, ports=tuple(
        ServicePort(name=pn, port=p, target_port=tp, app_protocol=app_protocol)
        for pn, p, tp in ports))


def endpoints(svc: Service, *ips: str, zone: str | None = None, ready: bool = True,
              name: str | None = None) -> EndpointSet:
    ports = MappingProxyType({p.name: int(p.target_port) for p in svc.ports})
    return EndpointSet(namespace=svc.namespace, service=svc.name, name=name or f"{svc.name}-1",
                       endpoints=tuple(Endpoint(ip=ip, ready=ready, ports=ports, zone=zone)
                                       for ip in ips))


def registry(*items: Service | EndpointSet) -> Registry:
    svcs = {s.key: s for s in items if isinstance(s, Service)}
    sets = tuple(e for e in items if isinstance(e, EndpointSet))
    nss = {s.namespace: Namespace(s.namespace) for s in svcs.values()}
    return Registry(namespaces=MappingProxyType(nss), services=MappingProxyType(svcs),
                    endpoint_sets=sets)


WEB = service("web", "198.19.0.10", ("http", 80, 8080))
DB = service("db", "198.19.0.11", ("tcp-pg", 5432, 5432))
CACHE = service("cache", "198.19.0.12", ("tcp-redis", 6379, 6379))


def cluster(svc: Service) -> str:
    return naming.cluster_name(svc.name, svc.namespace, svc.ports[0].port)


def route(svc: Service) -> str:
    return naming.route_name(svc.name, svc.namespace, svc.ports[0].port)


def vip_listener(svc: Service) -> str:
    assert svc.cluster_ip is not None
    return naming.vip_listener_name(svc.cluster_ip, svc.ports[0].port)


def api_listener(svc: Service) -> str:
    return naming.api_listener_name(svc.name, svc.namespace, svc.ports[0].port)


def snapshot(*items: Service | EndpointSet) -> Snapshot:
    return translate(registry(*items))


# -- an ADS server and scripted clients ------------------------------------------------------

def run(coro_fn: Callable[[], Awaitable[T]], timeout: float = 30) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro_fn(), timeout)
    return asyncio.run(bounded())


class AdsHarness:
    """A real grpc.aio ADS server on 127.0.0.1:<ephemeral> serving a cache."""

    def __init__(self, snap: Snapshot | None = None) -> None:
        self.cache = SnapshotCache()
        if snap is not None:
            self.cache.set_snapshot(snap)
        self.server: grpc.aio.Server | None = None
        self.channel: grpc.aio.Channel | None = None
        self.clients: list[_Client] = []

    async def __aenter__(self) -> AdsHarness:
        self.server = grpc.aio.server()
        add_to_server(self.server, self.cache)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for c in self.clients:
            c.close()
        if self.channel is not None:
            await self.channel.close()
        if self.server is not None:
            await self.server.stop(0)

    def sotw(self, node: str = "node-a") -> SotwClient:
        c = SotwClient(self.stub, node)
        self.clients.append(c)
        return c

    def delta(self, node: str = "node-a") -> DeltaClient:
        c = DeltaClient(self.stub, node)
        self.clients.append(c)
        return c

    def set(self, snap: Snapshot) -> None:
        self.cache.set_snapshot(snap)


class _Client:
    """One ADS stream: requests go in through a queue, responses are read by a
    background task into another, so waiting for one never cancels the call."""

    def __init__(self, node: str) -> None:
        self.node = node
        self._out: asyncio.Queue[Any] = asyncio.Queue()
        self._in: asyncio.Queue[Any] = asyncio.Queue()
        self._first = True
        self.call: Any = None
        self.error: grpc.aio.AioRpcError | None = None

    async def _requests(self) -> AsyncIterator[Any]:
        while True:
            item = await self._out.get()
            if item is None:
                return
            yield item

    async def _pump(self) -> None:
        try:
            while True:
                resp = await self.call.read()
                if resp is grpc.aio.EOF:
                    break
                self._in.put_nowait(resp)
        except grpc.aio.AioRpcError as exc:
            self.error = exc
        except asyncio.CancelledError:
            pass
        self._in.put_nowait(None)

    def _start(self, call: Any) -> None:
        self.call = call
        self._task = asyncio.get_running_loop().create_task(self._pump())

    def _node(self, req: Any) -> Any:
        if self._first:
            req.node.id = self.node
            self._first = False
        self._out.put_nowait(req)
        return req

    async def recv(self, timeout: float = 5.0) -> Any:
        resp = await asyncio.wait_for(self._in.get(), timeout)
        if resp is None:
            raise AssertionError(f"stream ended: {self.error}")
        return resp

    async def silent(self, wait: float = 0.4) -> None:
        """Assert that nothing arrives for ``wait`` seconds."""
        try:
            resp = await asyncio.wait_for(self._in.get(), wait)
        except TimeoutError:
            return
        raise AssertionError(f"expected no response, got {resp}")

    async def ended(self, timeout: float = 5.0) -> grpc.aio.AioRpcError | None:
        while True:
            resp = await asyncio.wait_for(self._in.get(), timeout)
            if resp is None:
                return self.error

    def close(self) -> None:
        self._out.put_nowait(None)
        if self.call is not None:
            self.call.cancel()


class SotwClient(_Client):
    def __init__(self, stub: ads_pb2_grpc.AggregatedDiscoveryServiceStub, node: str) -> None:
        super().__init__(node)
        self._start(stub.StreamAggregatedResources(self._requests()))

    def request(self, type_url: str, names: Iterable[str] = (), version: str = "",
                nonce: str = "", error: str | None = None, omit_type: bool = False
                ) -> discovery_pb2.DiscoveryRequest:
        req = discovery_pb2.DiscoveryRequest(type_url="" if omit_type else type_url,
                                             resource_names=list(names), version_info=version,
                                             response_nonce=nonce)
        if error is not None:
            req.error_detail.code = 3
            req.error_detail.message = error
        return self._node(req)

    def ack(self, resp: discovery_pb2.DiscoveryResponse, names: Iterable[str] = ()
            ) -> discovery_pb2.DiscoveryRequest:
        return self.request(resp.type_url, names, resp.version_info, resp.nonce)


class DeltaClient(_Client):
    def __init__(self, stub: ads_pb2_grpc.AggregatedDiscoveryServiceStub, node: str) -> None:
        super().__init__(node)
        self._start(stub.DeltaAggregatedResources(self._requests()))

    def request(self, type_url: str, subscribe: Iterable[str] = (), unsubscribe: Iterable[str] = (),
                nonce: str = "", error: str | None = None,
                initial: dict[str, str] | None = None) -> discovery_pb2.DeltaDiscoveryRequest:
        req = discovery_pb2.DeltaDiscoveryRequest(
            type_url=type_url, resource_names_subscribe=list(subscribe),
            resource_names_unsubscribe=list(unsubscribe), response_nonce=nonce,
            initial_resource_versions=initial or {})
        if error is not None:
            req.error_detail.code = 3
            req.error_detail.message = error
        return self._node(req)

    def ack(self, resp: discovery_pb2.DeltaDiscoveryResponse) -> discovery_pb2.DeltaDiscoveryRequest:
        return self.request(resp.type_url, nonce=resp.nonce)


def names(resp: Any) -> list[str]:
    """Resource names in a SotW or delta response."""
    if isinstance(resp, discovery_pb2.DeltaDiscoveryResponse):
        return sorted(r.name for r in resp.resources)
    out = []
    for a in resp.resources:
        msg = _unpack(resp.type_url, a)
        out.append(msg.cluster_name if resp.type_url == EDS else msg.name)
    return sorted(out)


def _unpack(type_url: str, a: Any) -> Any:
    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.config.endpoint.v3 import endpoint_pb2
    from envoy.config.listener.v3 import listener_pb2
    from envoy.config.route.v3 import route_pb2

    cls = {CDS: cluster_pb2.Cluster, EDS: endpoint_pb2.ClusterLoadAssignment,
           LDS: listener_pb2.Listener, RDS: route_pb2.RouteConfiguration}[type_url]
    msg = cls()
    assert a.Unpack(msg)
    return msg
