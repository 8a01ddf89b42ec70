"""Outbound L4: connections captured on a pod's in-pod listener (15001).

accept -> original destination from BPF -> service -> round-robin backend ->
connect from inside the client pod's netns (so the backend sees the pod's own
IP, as with ztunnel) -> relay bytes both ways. The upstream socket carries the
proxy mark, so connect4 never redirects the proxy's own connections.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from agent.bpf_layout import FlowKey
from dataplane.connect import connect_from_pod
from dataplane.flows import Flow, FlowTable
from dataplane.http1_proxy import Http1Proxy, new_channel
from dataplane.http2_proxy import Http2Proxy
from dataplane.lb import RoundRobin
from dataplane.protocols.detect import Sniffer
from dataplane.relay import RelaySide, reset
from dataplane.services import ServiceEntry, ServiceTable
from dataplane.upstream_sockets import UpstreamSockets

log = logging.getLogger("nodemesh.outbound")

MAX_CONNECT_ATTEMPTS = 3


@dataclass(frozen=True)
class PodContext:
    """What the proxy needs of an enrolled pod to serve its connections."""

    key: str
    ip: str | None
    netns_fd: int
    netns_cookie: int
    # Ready upstream sockets in this pod's netns (None: one made per connect).
    sockets: UpstreamSockets | None = field(default=None, compare=False)


OrigDstLookup = Callable[[FlowKey], "tuple[str, int] | None"]


class L4Engine(Protocol):
    """Takes a connected flow over from the userspace relay (sockmap, splice(2))."""

    stats: dict[str, int]
    # Whether flows whose port declares no protocol (sniffed as opaque TCP, their
    # first bytes already read) are handed over too, or only declared-TCP ports.
    takes_sniffed: bool

    async def start(self, flow: Flow, down: RelaySide, up: RelaySide) -> bool:
        """True: the engine owns the flow; False: nothing changed, relay it."""
        ...


class OutboundProxy:
    def __init__(self, orig_dst: OrigDstLookup, flows: FlowTable,
                 connect_timeout: float = 1.0, http: Http1Proxy | None = None,
                 sniff_window: float = 0.25,
                 on_tcp_open: Callable[[Flow, str | None], None] | None = None,
                 http2: Http2Proxy | None = None, splicer: L4Engine | None = None) -> None:
        self.table = ServiceTable()
        self._orig_dst = orig_dst
        self.flows = flows
        self.lb = RoundRobin()
        self.connect_timeout = connect_timeout
        self.http = http
        self.http2 = http2
        self.sniff_window = sniff_window
        self.on_tcp_open = on_tcp_open
        self.splicer = splicer  # an in-kernel L4 engine for plain TCP flows; None: the relay
        self.stats = {"accepted": 0, "no_original_dst": 0, "no_service": 0,
                      "no_endpoint": 0, "connect_failed": 0, "relayed": 0, "http": 0,
                      "http2": 0, "sniffed_http": 0, "sniffed_tcp": 0}

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
        if entry.protocol != "tcp" and (self.http is not None or self.http2 is not None):
            speaks = await self._protocol_of(entry.protocol, down)
            if speaks == "http1" and self.http is not None:
                await self._serve_http1(pod, entry, down, flow)
                return
            if speaks == "http2" and self.http2 is not None:
                await self._serve_http2(pod, entry, down, flow)
                return
        if not entry.backends:
            self.stats["no_endpoint"] += 1
            log.info("%s: %s has no ready endpoint: reset", pod.key, entry.service)
            self._fail(flow, down, "no_endpoint")
            return
        for attempt, backend in enumerate(self.lb.candidates(entry)):
            if attempt >= MAX_CONNECT_ATTEMPTS:
                break
            if down.closed:
                self.flows.close(flow)
                return
            up = RelaySide(on_bytes=lambda n: _add_received(flow, n))
            try:
                await connect_from_pod(pod.netns_fd, backend, self.connect_timeout,
                                       lambda up=up: up, pod.sockets)
            except (TimeoutError, OSError) as exc:
                self.stats["connect_failed"] += 1
                if getattr(exc, "errno", None) == errno.EMFILE:
                    log.error("%s: cannot open an upstream socket: %s", pod.key, exc)
                    break
                log.info("%s: connect to %s for %s failed (%s), trying the next endpoint",
                         pod.key, backend.address, entry.service,
                         getattr(exc, "strerror", None) or "timeout")
                continue
            flow.endpoint = backend.address
            flow.state = "established"
            self.stats["relayed"] += 1
            if self.on_tcp_open is not None:
                self.on_tcp_open(flow, entry.cluster)
            if self.splicer is not None and (entry.protocol == "tcp" or self.splicer.takes_sniffed) \
                    and await self.splicer.start(flow, down, up):
                return
            # link() handles either side having gone away meanwhile.
            down.link(up)
            up.link(down)
            transport.resume_reading()
            return
        self._fail(flow, down, "connect_failed")

    async def _protocol_of(self, declared: str, down: _Downstream) -> str:
        """http1 / http2 / tcp: declared, or sniffed from the first bytes within the
        window (a server-first protocol sends nothing and gets tcp after it)."""
        if declared == "http":
            return "http1"
        if declared in ("http2", "grpc"):
            return "http2"
        sniffer = Sniffer()
        # Bytes may already have been read (a client that writes at once can beat
        # the pause in connection_made): they are the first the sniffer must see.
        early = down.peek_buffer()
        if early:
            sniffer.feed(early)
        down.sniffer = sniffer
        assert down.transport is not None
        down.transport.resume_reading()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.sniff_window
        try:
            while sniffer.decision is None and not down.got_eof and not down.closed:
                left = deadline - loop.time()
                if left <= 0:
                    break
                down.arrived.clear()
                try:
                    await asyncio.wait_for(down.arrived.wait(), left)
                except TimeoutError:
                    break
        finally:
            down.sniffer = None
            if down.transport is not None and not down.closed:
                down.transport.pause_reading()
        decision = sniffer.decision or sniffer.timeout()
        self.stats["sniffed_http" if decision in ("http1", "http2") else "sniffed_tcp"] += 1
        return decision if decision in ("http1", "http2") else "tcp"

    async def _serve_http1(self, pod: PodContext, entry: ServiceEntry, down: _Downstream,
                           flow: Flow) -> None:
        assert self.http is not None and down.transport is not None
        self.stats["http"] += 1
        flow.state = "http"
        flow.endpoint = "(per request)"
        initial = b"".join(down.take_buffer())
        _, channel = new_channel()
        transport = down.transport
        down.flow = None  # the channel owns the connection from here
        channel.adopt(transport, initial)
        transport.resume_reading()
        try:
            await self.http.serve(pod.key, pod.ip, pod.netns_fd, entry, channel)
        finally:
            flow.bytes_sent = channel.bytes_in
            flow.bytes_received = channel.bytes_out
            self.flows.close(flow)

    async def _serve_http2(self, pod: PodContext, entry: ServiceEntry, down: _Downstream,
                           flow: Flow) -> None:
        """Hand the connection to the HTTP/2 path: it adopts the transport and replays
        what sniffing read."""
        assert self.http2 is not None and down.transport is not None
        self.stats["http2"] += 1
        flow.state = "http2"
        flow.endpoint = "(per stream)"
        initial = b"".join(down.take_buffer())
        transport = down.transport
        down.flow = None  # the HTTP/2 path owns the connection from here
        try:
            flow.bytes_sent, flow.bytes_received = await self.http2.serve(
                pod.key, pod.ip, pod.netns_fd, entry, transport, initial)
        finally:
            self.flows.close(flow)

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
        self.sniffer: Sniffer | None = None
        self.arrived = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        if self.sniffer is not None and self.sniffer.decision is None:
            self.sniffer.feed(data)
        super().data_received(data)
        self.arrived.set()

    def eof_received(self) -> bool:
        keep = super().eof_received()
        self.arrived.set()
        return keep

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
