"""The splice(2) L4 engine (`nodemesh agent --l4-engine splice`).

Each direction of a plain TCP flow moves socket -> pipe -> socket with
splice(2): the payload pages go from one socket's receive queue to the other's
send queue without being copied through user space, while the proxy keeps
every decision the userspace relay makes (when to read, backpressure, EOF,
reset), because it still issues each splice itself on the event loop.

Taking a flow over from asyncio: reading is paused on both transports, what
user space already holds (the client's first bytes, a server greeting) is
written out and flushed, and only then is each socket duplicated and its
transport dropped (with an inert protocol, so dropping it forwards nothing).
Bytes left in the kernel's receive queues are spliced like any later byte, so
nothing is reordered.

Per direction the state machine is small: read (splice socket -> pipe) only
while the pipe is empty; write (pipe -> socket) until it is empty, waiting for
the peer socket to become writable when its send buffer is full, and not
reading meanwhile (that is the backpressure). EOF from the source, once the
pipe is drained, becomes shutdown(SHUT_WR) on the destination (half-close); a
reset on either socket resets the other, as the userspace relay does.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import socket
import struct
from collections.abc import Callable

from dataplane.flows import Flow
from dataplane.relay import RelaySide, reset

log = logging.getLogger("nodemesh.pipe_splice")

F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ appears in Python 3.10, but not on every build
PIPE_BYTES = 256 * 1024  # per direction; the kernel allocates pages only as they fill
FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
FLUSH_POLL = 0.002
_LINGER_RESET = struct.pack("ii", 1, 0)
# errors that end a flow (the peer went away); anything else is a bug worth a log line
_GONE = {errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT, errno.ENOTCONN, errno.EHOSTUNREACH,
         errno.ENETUNREACH, errno.ECONNABORTED}


class _Inert(asyncio.Protocol):
    """Takes a transport's last callbacks once the engine owns its socket."""


def _take_socket(side: RelaySide) -> socket.socket:
    """The side's socket as our own object; its transport is dropped without
    touching the connection (close() of one of two descriptors sends nothing)."""
    transport = side.transport
    assert transport is not None
    fd = os.dup(transport.get_extra_info("socket").fileno())
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    transport.set_protocol(_Inert())
    transport.abort()  # type: ignore[attr-defined]
    return sock


class _Direction:
    """src -> pipe -> dst for one direction of a flow."""

    def __init__(self, flow: _Spliced, src: socket.socket, dst: socket.socket,
                 count: Callable[[int], None]) -> None:
        self.flow = flow
        self.src, self.dst = src, dst
        self.count = count
        self.pipe_r, self.pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # a smaller pipe (pipe-max-size) only costs syscalls
            fcntl.fcntl(self.pipe_w, F_SETPIPE_SZ, PIPE_BYTES)
        self.in_pipe = 0
        self.eof = False
        self.done = False
        self.reading = False
        self.writing = False

    def start(self) -> None:
        self._want_read(True)

    def _want_read(self, on: bool) -> None:
        if on == self.reading:
            return
        self.reading = on
        loop = self.flow.loop
        if on:
            loop.add_reader(self.src.fileno(), self.on_readable)
        else:
            loop.remove_reader(self.src.fileno())

    def _want_write(self, on: bool) -> None:
        if on == self.writing:
            return
        self.writing = on
        loop = self.flow.loop
        if on:
            loop.add_writer(self.dst.fileno(), self.on_writable)
        else:
            loop.remove_writer(self.dst.fileno())

    def on_readable(self) -> None:
        try:
            n = os.splice(self.src.fileno(), self.pipe_w, PIPE_BYTES, flags=FLAGS)
        except BlockingIOError:
            return
        except OSError as exc:
            self.flow.fail(exc)
            return
        if n == 0:
            self.eof = True
            self._want_read(False)
            self._drained()
            return
        self.in_pipe += n
        self.count(n)
        self.on_writable()

    def on_writable(self) -> None:
        while self.in_pipe:
            try:
                n = os.splice(self.pipe_r, self.dst.fileno(), self.in_pipe, flags=FLAGS)
            except BlockingIOError:
                # The peer's send buffer is full: stop reading until it drains.
                self._want_read(False)
                self._want_write(True)
                return
            except OSError as exc:
                self.flow.fail(exc)
                return
            self.in_pipe -= n
        self._want_write(False)
        if self.eof:
            self._drained()
        elif not self.done:
            self._want_read(True)

    def _drained(self) -> None:
        """EOF seen and every byte handed on: pass the half-close along."""
        if self.in_pipe or self.done:
            return
        self.done = True
        with contextlib.suppress(OSError):
            self.dst.shutdown(socket.SHUT_WR)
        self.flow.direction_done()

    def stop(self) -> None:
        self._want_read(False)
        self._want_write(False)
        for fd in (self.pipe_r, self.pipe_w):
            with contextlib.suppress(OSError):
                os.close(fd)


class _Spliced:
    """One flow under the engine: two directions, one end."""

    def __init__(self, engine: PipeSplicer, flow: Flow, down: socket.socket,
                 up: socket.socket) -> None:
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.flow = flow
        self.down, self.up = down, up
        self.dirs = (_Direction(self, down, up, self._sent),
                     _Direction(self, up, down, self._received))
        self.finished = False

    def _sent(self, n: int) -> None:
        self.flow.bytes_sent += n

    def _received(self, n: int) -> None:
        self.flow.bytes_received += n

    def start(self) -> None:
        for d in self.dirs:
            d.start()

    def direction_done(self) -> None:
        if all(d.done for d in self.dirs):
            self.finish()

    def fail(self, exc: OSError) -> None:
        """A socket failed: the other end learns it at once (RST), as with the relay."""
        if exc.errno not in _GONE:
            log.warning("flow %d: splice failed: %s; resetting both ends", self.flow.id, exc)
        for sock in (self.down, self.up):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        self.engine.stats["reset"] += 1
        self.finish()

    def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        for d in self.dirs:
            d.stop()
        for sock in (self.down, self.up):
            sock.close()
        self.engine.active.discard(self)
        self.engine.on_done(self.flow)


class PipeSplicer:
    """The engine: ``start`` takes over a connected flow from the relay."""

    def __init__(self, on_done: Callable[[Flow], None], flush_timeout: float = 2.0) -> None:
        self.on_done = on_done  # the flow ended (both ways, or reset): close it in the table
        self.flush_timeout = flush_timeout
        self.active: set[_Spliced] = set()
        self.stats = {"spliced": 0, "not_spliceable": 0, "fallback": 0, "reset": 0}

    async def start(self, flow: Flow, down: RelaySide, up: RelaySide) -> bool:
        """True: the engine owns the flow from now on. False: nothing changed
        hands, the caller links the relay as usual."""
        dt, ut = down.transport, up.transport
        if dt is None or ut is None or down.closed or up.closed or down.got_eof or up.got_eof:
            self.stats["not_spliceable"] += 1
            return False
        ut.pause_reading()  # the downstream is paused until linked
        for chunk in down.take_buffer():
            ut.write(chunk)
        for chunk in up.take_buffer():
            dt.write(chunk)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.flush_timeout
        while dt.get_write_buffer_size() or ut.get_write_buffer_size():
            if down.closed or up.closed or loop.time() > deadline:
                return self._fallback(ut)
            await asyncio.sleep(FLUSH_POLL)
        if down.closed or up.closed or dt.is_closing() or ut.is_closing() \
                or down.got_eof or up.got_eof:
            return self._fallback(ut)
        try:
            dsock = _take_socket(down)
        except OSError as exc:  # out of descriptors: keep relaying in user space
            log.warning("flow %d: cannot take the socket over (%s): relaying", flow.id, exc)
            return self._fallback(ut)
        try:
            usock = _take_socket(up)
        except OSError:
            # The downstream is ours already and its transport gone: end the flow cleanly.
            dsock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            dsock.close()
            reset(ut)
            self.on_done(flow)
            return True
        # The RelaySides' own close callbacks went with their transports.
        down.closed = up.closed = True
        flow.state = "spliced"
        self.stats["spliced"] += 1
        spliced = _Spliced(self, flow, dsock, usock)
        self.active.add(spliced)
        spliced.start()
        return True

    def _fallback(self, ut: asyncio.Transport) -> bool:
        self.stats["fallback"] += 1
        if not ut.is_closing():
            ut.resume_reading()
        return False

    def close_all(self) -> None:
        """Agent shutdown: reset every spliced flow (the relay's transports go the same way)."""
        for s in list(self.active):
            for sock in (s.down, s.up):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            s.finish()
