"""Upstream sockets for one enrolled pod, made ahead of need in the pod's netns.

A proxied connection's upstream socket must live in the client pod's netns (the
endpoint then sees the pod's own IP) and carry the proxy mark (connect4 never
redirects it). Making one costs two setns() calls around socket(), plus the
options; the pool makes them a batch at a time under one setns pair, so the
per-connection path only pops a ready socket. A socket keeps the netns it was
created in, whichever thread later connects it.

The pool holds at most ``batch - 1`` idle, unconnected sockets per pod, and
closes them when the pod leaves the mesh (``close``), which also lets the
pod's netns go once its last flow has ended.
"""

from __future__ import annotations

import socket

from agent import netns
from agent.bpf_layout import PROXY_MARK

DEFAULT_BATCH = 8


def new_upstream_socket(netns_fd: int) -> socket.socket:
    """One upstream socket in ``netns_fd``: TCP, marked, no Nagle, non-blocking."""
    sock = netns.socket_in(netns_fd)
    try:
        _prepare(sock)
    except BaseException:
        sock.close()
        raise
    return sock


def _prepare(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, PROXY_MARK)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)


class UpstreamSockets:
    """Ready upstream sockets for the pod whose netns is ``netns_fd`` (not owned:
    the caller closes it, after ``close``). Used from one thread, the event loop's."""

    def __init__(self, netns_fd: int, batch: int = DEFAULT_BATCH) -> None:
        if batch < 1:
            raise ValueError(f"batch must be at least 1, not {batch}")
        self.netns_fd = netns_fd
        self.batch = batch
        self._ready: list[socket.socket] = []
        self.closed = False
        self.created = 0  # sockets made so far, for tests and diagnostics

    def __len__(self) -> int:
        return len(self._ready)

    def take(self) -> socket.socket:
        """A socket for one connect; the caller owns it from here (and closes it
        if the connect fails). After ``close`` (a pod leaving while a handler
        still connects) each call makes a single socket, as without a pool.
        Raises OSError (EMFILE: out of descriptors) when none can be made."""
        if self._ready:
            return self._ready.pop()
        if self.closed:
            return new_upstream_socket(self.netns_fd)
        self._fill()
        return self._ready.pop()

    def _fill(self) -> None:
        made: list[socket.socket] = []
        try:
            with netns.entered(self.netns_fd):
                for _ in range(self.batch):
                    made.append(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        except OSError:
            if not made:
                raise  # not even one (out of descriptors?): the caller reports it
            # Fewer than a batch (near the descriptor limit): use what was made.
        try:
            for sock in made:
                _prepare(sock)
        except BaseException:
            for sock in made:
                sock.close()
            raise
        self.created += len(made)
        self._ready.extend(made)

    def close(self) -> None:
        """Close the idle sockets; later ``take`` calls make one at a time."""
        self.closed = True
        ready, self._ready = self._ready, []
        for sock in ready:
            sock.close()
