"""Protocol detection on the outbound path, on loopback (no root): the proxy
must classify a client's first bytes whether they arrive before or after it
starts looking, and give server-first protocols TCP after the sniff window."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from types import MappingProxyType

import uvloop

from dataplane.flows import FlowTable
from dataplane.http1_proxy import Http1Proxy
from dataplane.outbound import OutboundProxy, PodContext
from dataplane.services import ServiceEntry, ServiceTable
from dataplane.upstreams import Upstreams

VIP = ("198.19.1.11", 8000)
REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


async def _proxy(window: float) -> tuple[OutboundProxy, tuple[str, int]]:
    fd = os.open("/proc/self/ns/net", os.O_RDONLY)
    entry = ServiceEntry(1, "shop/plain", "", VIP[0], VIP[1], (), protocol="auto")
    proxy = OutboundProxy(lambda _k: VIP, FlowTable(), http=Http1Proxy(Upstreams(), 1.0),
                          sniff_window=window)
    proxy.set_table(ServiceTable(MappingProxyType({VIP: entry})))
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen()
    lst.setblocking(False)
    await proxy.serve(PodContext("shop/c", "198.18.0.10", fd, 0), lst)
    return proxy, lst.getsockname()


async def _exchange(addr: tuple[str, int], first: bytes, delay: float) -> bytes:
    s = socket.create_connection(addr)
    if not delay:
        s.sendall(first)  # queued before the proxy even accepts
    s.setblocking(False)
    r, w = await asyncio.open_connection(sock=s)
    if delay:
        await asyncio.sleep(delay)
        w.write(first)
    try:
        return await asyncio.wait_for(r.read(200), 5)
    except ConnectionResetError:
        return b"<reset>"
    finally:
        w.close()


def test_http_is_detected_whenever_its_bytes_arrive() -> None:
    async def main() -> None:
        proxy, addr = await _proxy(0.25)
        for delay in (0, 0, 0.01, 0.05, 0):
            answer = await _exchange(addr, REQUEST, delay)
            # No route table for this entry: the HTTP path answers 404 itself.
            assert answer.startswith(b"HTTP/1.1 404"), (delay, answer)
        assert proxy.stats["sniffed_http"] == 5 and proxy.stats["sniffed_tcp"] == 0

    uvloop.run(main())


def test_silent_client_gets_tcp_after_the_window() -> None:
    async def main() -> None:
        proxy, addr = await _proxy(0.2)
        s = socket.create_connection(addr)
        s.setblocking(False)
        t0 = time.monotonic()
        r, w = await asyncio.open_connection(sock=s)
        try:
            got = await asyncio.wait_for(r.read(10), 5)  # no endpoints: reset or EOF
        except ConnectionResetError:
            got = b""
        took = time.monotonic() - t0
        w.close()
        assert got == b""
        assert 0.15 < took < 1.0, took
        assert proxy.stats["sniffed_tcp"] == 1

    uvloop.run(main())
