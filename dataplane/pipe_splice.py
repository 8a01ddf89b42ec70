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
from dataplane.relay import RelaySide, flush_for_takeover

log = logging.getLogger("nodemesh.pipe_splice")

F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ appears in Python 3.10, but not on every build
F_GETPIPE_SZ = 1032
SIOCATMARK = 0x8905
PIPE_BYTES = 256 * 1024  # per direction; the kernel allocates pages only as they fill
FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_LINGER_RESET = struct.pack("ii", 1, 0)
# errors that end a flow (the peer went away); anything else is a bug worth a log line
_GONE = {errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT, errno.ENOTCONN, errno.EHOSTUNREACH,
         errno.ENETUNREACH, errno.ECONNABORTED}


class _Inert(asyncio.Protocol):
    """Takes a transport's last callbacks once the engine owns its socket."""


def _new_pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    with contextlib.suppress(OSError):  # a smaller pipe (pipe-max-size) only costs syscalls
        fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_BYTES)
    return r, w


def _dup_fd(side: RelaySide) -> int:
    transport = side.transport
    assert transport is not None
    return os.dup(transport.get_extra_info("socket").fileno())


def _socket_of(fd: int) -> socket.socket:
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    return sock


def _drop_transport(side: RelaySide) -> None:
    """Let go of the side's transport without touching the connection: we hold a
    duplicate descriptor, and close() of one of two sends nothing."""
    transport = side.transport
    assert transport is not None
    transport.set_protocol(_Inert())
    transport.abort()  # type: ignore[attr-defined]


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class _Direction:
    """src -> pipe -> dst for one direction of a flow."""

    def __init__(self, flow: _Spliced, src: socket.socket, dst: socket.socket,
                 pipe: tuple[int, int], count: Callable[[int], None]) -> None:
        self.flow = flow
        self.src, self.dst = src, dst
        self.count = count
        self.pipe_r, self.pipe_w = pipe
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
            if n == 0 or n is None:
                n = self._past_urgent_mark(0)
        except BlockingIOError:
            try:
                n = self._past_urgent_mark(None)
            except OSError as exc:
                self.flow.fail(exc)
                return
            if n is None:
                return  # nothing yet
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

    def _past_urgent_mark(self, default: int | None) -> int | None:
        """TCP urgent data (MSG_OOB) stops splice(2) at the urgent mark: it says
        EAGAIN for ever while poll() says readable, and a FIN behind the mark
        reads as EOF with the bytes after the mark still queued. At the mark, one
        recv() (which steps over the urgent byte, as the relay's reads do) moves
        the bytes into the empty pipe; splicing resumes after them. Returns the
        bytes moved (0: a real EOF), or ``default`` when not at the mark."""
        fd = self.src.fileno()
        at_mark = struct.unpack("i", fcntl.ioctl(fd, SIOCATMARK, b"\0\0\0\0"))[0]
        if not at_mark:
            return default
        room = fcntl.fcntl(self.pipe_w, F_GETPIPE_SZ)
        data = self.src.recv(room)
        if data:
            os.write(self.pipe_w, data)  # the pipe is empty (we read only then): it fits
        return len(data)

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
        _close_fds([self.pipe_r, self.pipe_w])


class _Spliced:
    """One flow under the engine: two directions, one end."""

    def __init__(self, engine: PipeSplicer, flow: Flow, down: socket.socket,
                 up: socket.socket, pipes: tuple[tuple[int, int], tuple[int, int]]) -> None:
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.flow = flow
        self.down, self.up = down, up
        self.dirs = (_Direction(self, down, up, pipes[0], self._sent),
                     _Direction(self, up, down, pipes[1], self._received))
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

    takes_sniffed = True  # what sniffing read is flushed first, like any early byte

    def __init__(self, on_done: Callable[[Flow], None], flush_timeout: float = 2.0) -> None:
        self.on_done = on_done  # the flow ended (both ways, or reset): close it in the table
        self.flush_timeout = flush_timeout
        self.active: set[_Spliced] = set()
        self.closing = False
        self.stats = {"spliced": 0, "not_spliceable": 0, "fallback": 0, "reset": 0}

    async def start(self, flow: Flow, down: RelaySide, up: RelaySide) -> bool:
        """True: the engine owns the flow from now on. False: nothing changed
        hands, the caller links the relay as usual."""
        dt, ut = down.transport, up.transport
        if dt is None or ut is None or down.closed or up.closed or down.got_eof or up.got_eof:
            self.stats["not_spliceable"] += 1
            return False
        if not await flush_for_takeover(down, up, self.flush_timeout) \
                or down.got_eof or up.got_eof:
            return self._fallback(ut)
        if self.closing:  # the agent is stopping: no new takeover
            return self._fallback(ut)
        # Everything that can fail (descriptors: two pipes, two duplicates) is made
        # before anything changes hands: on failure the relay just carries on.
        made: list[int] = []
        try:
            made += _new_pipe()
            made += _new_pipe()
            made.append(_dup_fd(down))
            made.append(_dup_fd(up))
        except OSError as exc:  # out of descriptors: keep relaying in user space
            _close_fds(made)
            log.warning("flow %d: cannot take the flow over (%s): relaying it", flow.id, exc)
            return self._fallback(ut)
        pipes = ((made[0], made[1]), (made[2], made[3]))
        dsock, usock = _socket_of(made[4]), _socket_of(made[5])
        _drop_transport(down)
        _drop_transport(up)
        # The RelaySides' own close callbacks went with their transports.
        down.closed = up.closed = True
        flow.state = "spliced"
        self.stats["spliced"] += 1
        spliced = _Spliced(self, flow, dsock, usock, pipes)
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
        self.closing = True
        for s in list(self.active):
            for sock in (s.down, s.up):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            s.finish()
