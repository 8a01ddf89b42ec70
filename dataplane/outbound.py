"""Outbound L4: connections captured on a pod's in-pod listener (15001).

accept -> original destination from BPF -> service -> round-robin backend ->
connect from inside the client pod's netns (so the backend sees the pod's own
IP, as with ztunnel) -> relay bytes both ways. The upstream socket carries the
proxy mark, so connect4 never redirects the proxy's own connections.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass

from agent import netns
from agent.bpf_layout import PROXY_MARK, FlowKey
from dataplane.flows import Flow, FlowTable
from dataplane.lb import RoundRobin
from dataplane.relay import RelaySide, reset
from dataplane.services import ServiceTable

log = logging.getLogger("nodemesh.outbound")

MAX_CONNECT_ATTEMPTS = 3


@dataclass(frozen=True)
class PodContext:
    """What the proxy needs of an enrolled pod to serve its connections."""

    key: str
    ip: str | None
    netns_fd: int
    netns_cookie: int


OrigDstLookup = Callable[[FlowKey], "tuple[str, int] | None"]


class OutboundProxy:
    def __init__(self, orig_dst: OrigDstLookup, flows: FlowTable,
                 connect_timeout: float = 1.0) -> None:
        self.table = ServiceTable()
        self._orig_dst = orig_dst
        self.flows = flows
        self.lb = RoundRobin()
        self.connect_timeout = connect_timeout
        self.stats = {"accepted": 0, "no_original_dst": 0, "no_service": 0,
                      "no_endpoint": 0, "connect_failed": 0, "relayed": 0}

    def set_table(self, table: ServiceTable) -> None:
        self.table = table  # one reference swap: in-flight lookups see old or new, never half

    async def serve(self, pod: PodContext, listener: socket.socket) -> asyncio.AbstractServer:
        loop = asyncio.get_running_loop()
        return await loop.create_server(lambda: _Downstream(self, pod), sock=listener)

    async def handle(self, pod: PodContext, down: _Downstream) -> None:
        transport = down.transport
        assert transport is not None
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        self.stats["accepted"] += 1
        orig = self._orig_dst(FlowKey.of(pod.netns_cookie, peer, local))
        if orig is None:
            self.stats["no_original_dst"] += 1
            log.warning("%s: connection from %s:%d has no original destination "
                        "(not redirected by nodemesh): reset", pod.key, *peer)
            reset(transport)
            return
        flow = self.flows.open(pod=pod.key, pod_ip=pod.ip, client=f"{peer[0]}:{peer[1]}",
                               original_dst=f"{orig[0]}:{orig[1]}")
        down.flow = flow
        entry = self.table.lookup(*orig)
        if entry is None:
            self.stats["no_service"] += 1
            log.warning("%s: %s:%d is not a mesh service any more: reset", pod.key, *orig)
            self._fail(flow, down, "no_service")
            return
        flow.service = entry.service
        if not entry.backends:
            self.stats["no_endpoint"] += 1
            log.info("%s: %s has no ready endpoint: reset", pod.key, entry.service)
            self._fail(flow, down, "no_endpoint")
            return
        loop = asyncio.get_running_loop()
        for attempt, backend in enumerate(self.lb.candidates(entry)):
            if attempt >= MAX_CONNECT_ATTEMPTS:
                break
            try:
                sock = netns.socket_in(pod.netns_fd)
            except OSError as exc:  # EMFILE and the like: nothing to retry on
                log.error("%s: cannot open an upstream socket: %s", pod.key, exc.strerror)
                break
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, PROXY_MARK)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setblocking(False)
                await asyncio.wait_for(loop.sock_connect(sock, (backend.ip, backend.port)),
                                       self.connect_timeout)
                if down.closed:
                    sock.close()
                    self.flows.close(flow)
                    return
                up = RelaySide(on_bytes=lambda n: _add_received(flow, n))
                await loop.create_connection(lambda up=up: up, sock=sock)
            except (TimeoutError, OSError) as exc:
                sock.close()
                self.stats["connect_failed"] += 1
                log.info("%s: connect to %s for %s failed (%s), trying the next endpoint",
                         pod.key, backend.address, entry.service,
                         getattr(exc, "strerror", None) or "timeout")
                continue
            flow.endpoint = backend.address
            flow.state = "established"
            self.stats["relayed"] += 1
            # link() handles either side having gone away meanwhile.
            down.link(up)
            up.link(down)
            transport.resume_reading()
            return
        self._fail(flow, down, "connect_failed")

    def _fail(self, flow: Flow, down: _Downstream, state: str) -> None:
        flow.state = state
        self.flows.close(flow)
        if down.transport is not None:
            reset(down.transport)


def _add_received(flow: Flow, n: int) -> None:
    flow.bytes_received += n


class _Downstream(RelaySide):
    """The client side of a captured connection."""

    def __init__(self, proxy: OutboundProxy, pod: PodContext) -> None:
        super().__init__(on_bytes=self._count, on_closed=self._closed)
        self.proxy = proxy
        self.pod = pod
        self.flow: Flow | None = None
        self._task: asyncio.Task[None] | None = None

    def _count(self, n: int) -> None:
        if self.flow is not None:
            self.flow.bytes_sent += n

    def _closed(self) -> None:
        if self.flow is not None:
            self.proxy.flows.close(self.flow)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.transport.pause_reading()  # nothing to forward to until upstream is up
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            await self.proxy.handle(self.pod, self)
        except Exception:
            log.exception("%s: outbound connection failed", self.pod.key)
            if self.transport is not None and not self.transport.is_closing():
                reset(self.transport)
