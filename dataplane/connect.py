"""Opening an upstream connection the way the mesh does: from inside the
client pod's netns (the endpoint sees the pod's own IP, as with ztunnel),
marked so that connect4 never redirects the proxy's own sockets."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import TypeVar

from agent import netns
from agent.bpf_layout import PROXY_MARK
from dataplane.backend import Backend

P = TypeVar("P", bound=asyncio.BaseProtocol)


async def connect_from_pod(netns_fd: int, backend: Backend, timeout: float,
                           protocol: Callable[[], P]) -> tuple[asyncio.Transport, P]:
    """Raises OSError (refused, unreachable, too many files) or TimeoutError."""
    loop = asyncio.get_running_loop()
    sock = netns.socket_in(netns_fd)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, PROXY_MARK)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        await asyncio.wait_for(loop.sock_connect(sock, (backend.ip, backend.port)), timeout)
        transport, proto = await loop.create_connection(protocol, sock=sock)
    except BaseException:
        sock.close()
        raise
    return transport, proto  # type: ignore[return-value]
