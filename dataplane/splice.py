"""The sockmap L4 engine (experimental; `nodemesh agent --l4-engine sockmap`).

After the upstream connect, a plain TCP flow's two sockets are put in the
SOCKHASH nm_splice with each other as peers (nm_peer); bpf/sk_skb.c then
redirects every skb one of them receives to the other's egress, in the kernel.

Ordering, which is the whole difficulty:
- What user space already read (the downstream's early bytes, an upstream
  greeting) is written first, and both sockets' write buffers must be empty
  before either socket joins the map: redirected bytes go straight into the
  peer's send queue and would overtake anything asyncio still holds.
- Bytes still in a socket's receive queue when it joins the map wait for the
  next wake-up of the verdict; setting SO_RCVLOWAT wakes it at once.
- The upstream joins first: what it receives before the downstream is in
  cannot be redirected, so the verdict marks that direction passthru and user
  space relays it from then on (never both paths for one direction).
- FIN is not forwarded by the verdict: the sockets stay registered with the
  loop, which sees EOF, waits until the peer socket has taken every byte
  (bytes acked + SIOCOUTQ >= what user space and the kernel sent it) and only
  then shuts down the peer's write side. Closing earlier would drop what the
  kernel still queues for the peer.
- The verdict drops the FIN's empty skb (TCP has set RCV_SHUTDOWN already, so
  user space still sees EOF). Passed, it joins the socket's psock queue behind
  the bytes redirected to that socket, and the kernel's backlog worker takes
  its 0-byte delivery for a hard error: EPIPE, transmit disabled, the rest of
  the other direction stuck (see bpf/sk_skb.c).
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import socket
import struct
import termios
from typing import Any, Protocol

from dataplane.flows import Flow
from dataplane.relay import RelaySide, flush_for_takeover

log = logging.getLogger("nodemesh.splice")

SO_COOKIE = 57
TCP_INFO_LEN = 232
TCPI_BYTES_ACKED = 120  # offsets in struct tcp_info (u64 each)
TCPI_BYTES_RECEIVED = 128
KICK_EVERY = 0.01
POLL = 0.002
POLL_MAX = 0.05  # the EOF wait backs off to this: a slow reader can take seconds


class SpliceMaps(Protocol):
    def splice(self, first: tuple[int, int], second: tuple[int, int]) -> bool: ...
    def unsplice(self, *cookies: int) -> None: ...
    def spliced(self, cookie: int) -> tuple[int, bool] | None: ...


def socket_cookie(sock: Any) -> int:
    return int(struct.unpack("Q", sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0])


def tcp_counts(sock: Any) -> tuple[int, int]:
    """(bytes written into this TCP socket so far: acked + still queued, bytes it
    received). Both are off by a constant (the active opener's SYN is acked
    bytes, a FIN is a received byte): callers calibrate."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN)
    acked, received = struct.unpack_from("QQ", info, TCPI_BYTES_ACKED)
    outq = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    return int(acked) + int(outq), int(received)


def _inq(sock: Any) -> int:
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0])


class SockmapSplicer:
    takes_sniffed = False  # experimental: declared-TCP ports only, as tested

    def __init__(self, maps: SpliceMaps, flush_timeout: float = 2.0,
                 eof_timeout: float = 10.0) -> None:
        self.maps = maps
        self.flush_timeout = flush_timeout
        self.eof_timeout = eof_timeout
        self.stats = {"spliced": 0, "fallback": 0, "not_spliceable": 0, "passthru_directions": 0,
                      "eof_timeouts": 0}

    async def start(self, flow: Flow, down: RelaySide, up: RelaySide) -> bool:
        """Splice the pair, link the user-space relay (passthru data and EOF) and
        resume reading. False: nothing spliced, the caller links as usual (the
        buffers may have been flushed already, which link() does not mind)."""
        dt, ut = down.transport, up.transport
        if dt is None or ut is None or down.closed or up.closed or down.got_eof or up.got_eof:
            self.stats["not_spliceable"] += 1
            return False
        if not await flush_for_takeover(down, up, self.flush_timeout, POLL):
            return self._fallback(ut, "flush")
        dsock, usock = dt.get_extra_info("socket"), ut.get_extra_info("socket")
        try:
            dc, uc = socket_cookie(dsock), socket_cookie(usock)
            # tcp_counts() includes the active opener's SYN: calibrate on what user
            # space is known to have written into and read from each socket by now.
            (dtx, drx), (utx, urx) = tcp_counts(dsock), tcp_counts(usock)
            # received = read by user space + still queued (the verdict takes those)
            base = {id(down): (dtx - flow.bytes_received, drx - flow.bytes_sent - _inq(dsock)),
                    id(up): (utx - flow.bytes_sent, urx - flow.bytes_received - _inq(usock))}
        except OSError:
            return self._fallback(ut, "cookie")
        if not self.maps.splice((usock.fileno(), uc), (dsock.fileno(), dc)):
            log.warning("cannot splice flow %d (nm_splice full?): relaying in user space", flow.id)
            return self._fallback(ut, "map")
        for s in (usock, dsock):  # wake the verdict for bytes queued before the insert
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        self.stats["spliced"] += 1
        flow.state = "spliced"
        pair = _Pair(self, flow, down, up, dc, uc, base)
        down.on_eof = lambda: pair.eof(down)
        up.on_eof = lambda: pair.eof(up)
        for side in (down, up):
            chained = side.on_closed

            def closed(chained: Any = chained) -> None:
                pair.finish()
                if chained is not None:
                    chained()
            side.on_closed = closed
        down.link(up)
        up.link(down)
        dt.resume_reading()
        ut.resume_reading()
        return True

    def _fallback(self, ut: asyncio.Transport, why: str) -> bool:
        self.stats["fallback"] += 1
        log.debug("not spliced (%s): relaying in user space", why)
        if not ut.is_closing():
            ut.resume_reading()
        return False


class _Pair:
    def __init__(self, splicer: SockmapSplicer, flow: Flow, down: RelaySide, up: RelaySide,
                 down_cookie: int, up_cookie: int, base: dict[int, tuple[int, int]]) -> None:
        self.s = splicer
        self.flow = flow
        self.down, self.up = down, up
        self.cookie = {id(down): down_cookie, id(up): up_cookie}
        # per side: tcp_counts() of its socket before it wrote or received a byte
        self.base = base
        self.eof_done: set[int] = set()
        self.finished = False
        self.tasks: set[asyncio.Task[None]] = set()

    def eof(self, side: RelaySide) -> None:
        task = asyncio.get_running_loop().create_task(self._eof(side))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _eof(self, side: RelaySide) -> None:
        peer = side.peer
        if peer is None or peer.transport is None:
            return
        loop = asyncio.get_running_loop()
        # eof_timeout bounds a wait without progress, not the whole wait: the
        # splice has no backpressure from the peer's egress to this socket, so
        # a server can finish (EOF) long before a slow client has read its
        # bytes, which the kernel still holds for the peer and keeps sending.
        deadline = loop.time() + self.s.eof_timeout
        sock = peer.transport.get_extra_info("socket")
        src = side.transport.get_extra_info("socket") if side.transport is not None else None
        kicked = 0.0
        last_have = -1
        poll = POLL
        while not peer.closed and not peer.transport.is_closing() and src is not None:
            # Every byte ``side`` received (less its FIN) must be in the peer's
            # socket, whichever path it took: the verdict may not have run yet
            # for the last skbs when user space sees EOF, so wake it now and then.
            try:
                if loop.time() - kicked > KICK_EVERY:
                    src.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
                    kicked = loop.time()
                want = tcp_counts(src)[1] - 1 - self.base[id(side)][1]
                if self._passthru(side):
                    self._drain(side, src)
                have = (tcp_counts(sock)[0] - self.base[id(peer)][0]
                        + peer.transport.get_write_buffer_size())
            except OSError:
                break
            if have >= want:
                break
            if have > last_have:
                last_have = have
                deadline = loop.time() + self.s.eof_timeout
            elif loop.time() > deadline:
                self.s.stats["eof_timeouts"] += 1
                st = self.s.maps.spliced(self.cookie[id(side)])
                log.warning("flow %d: peer took %d of %d bytes after EOF, none for %.0fs (%s "
                            "redirected by the verdict): shutting down anyway", self.flow.id,
                            have, want, self.s.eof_timeout, st[0] if st else None)
                break
            await asyncio.sleep(poll)
            poll = min(poll * 2, POLL_MAX)
        self.eof_done.add(id(side))
        if peer.transport.is_closing():
            return
        if len(self.eof_done) == 2:
            peer.transport.close()  # both directions done: close() flushes
            if side.transport is not None:
                side.transport.close()
        elif peer.transport.can_write_eof():
            peer.transport.write_eof()

    def _passthru(self, side: RelaySide) -> bool:
        st = self.s.maps.spliced(self.cookie[id(side)])
        return bool(st and st[1])

    @staticmethod
    def _drain(side: RelaySide, src: Any) -> None:
        """A passthru direction after EOF: TCP sets RCV_SHUTDOWN as the FIN
        arrives, so user space can see EOF while the psock backlog still
        delivers earlier bytes of this socket (queued behind the peer's
        redirected ones); asyncio no longer reads after EOF, so relay them
        here, as data_received would. (Never for a spliced direction: there a
        read could take bytes the verdict has not redirected yet, out of order.)"""
        fd = src.fileno()  # uvloop's transport socket has no recv(): read the descriptor
        while True:
            try:
                data = os.read(fd, 65536)  # non-blocking: uvloop set O_NONBLOCK
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # reset: the transport reports it
            if not data:
                return
            side.data_received(data)

    def finish(self) -> None:
        """A side closed: account the spliced bytes and leave the maps (once)."""
        if self.finished:
            return
        self.finished = True
        for side in (self.down, self.up):
            st = self.s.maps.spliced(self.cookie[id(side)])
            if st is None:
                continue
            if st[1]:
                self.s.stats["passthru_directions"] += 1
            if side is self.down:
                self.flow.bytes_sent += st[0]
            else:
                self.flow.bytes_received += st[0]
        self.s.maps.unsplice(*self.cookie.values())
