"""A connection as a queue of protocol events, for the L7 proxy.

An asyncio Protocol feeds received bytes to a sans-IO codec and queues the
events it returns; the request handler awaits them in order. Flow control
both ways: reading pauses while too many body bytes wait in the queue, and
``drain()`` waits while the transport's write buffer is over its limit, so
a slow peer on either side throttles the other instead of filling memory.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Any, cast

from dataplane.relay import HIGH_WATER, reset

Feed = Callable[[bytes], list[Any]]
FeedEof = Callable[[], list[Any]]
QUEUE_HIGH = 1 << 20  # body bytes waiting to be handled before reading pauses


class ChannelClosed(ConnectionError):
    """The peer went away while we were writing to it."""


class EventChannel(asyncio.Protocol):
    def __init__(self, feed: Feed, feed_eof: FeedEof) -> None:
        self._feed = feed
        self._feed_eof = feed_eof
        self.transport: asyncio.Transport | None = None
        self._events: collections.deque[Any] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._queued = 0
        self._paused = False
        self._writable = asyncio.Event()
        self._writable.set()
        self.eof = False
        self.closed = False
        self.error: Exception | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.on_lost: Callable[[], None] | None = None  # e.g. a circuit breaker's slot

    # -- asyncio.Protocol ---------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=HIGH_WATER)

    def adopt(self, transport: asyncio.BaseTransport, initial: bytes = b"") -> None:
        """Take over a transport another protocol was handling (after sniffing)."""
        transport.set_protocol(self)
        self.connection_made(transport)
        if initial:
            self.data_received(initial)

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        events = self._feed(data)
        for ev in events:
            self._queued += len(getattr(ev, "data", b"") or b"")
        self._events.extend(events)
        if self._queued > QUEUE_HIGH and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._events.extend(self._feed_eof())
        self._wake()
        return True  # keep writing: an HTTP client may half-close and still want its answer

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.error = exc
        if self.on_lost is not None:
            on_lost, self.on_lost = self.on_lost, None
            on_lost()
        self._writable.set()
        self._wake()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # -- for the handler ------------------------------------------------------------
    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def next_event(self) -> Any | None:
        """The next event; None once the peer has closed and nothing is left."""
        while not self._events:
            if self.eof or self.closed:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        ev = self._events.popleft()
        self._queued -= len(getattr(ev, "data", b"") or b"")
        if self._paused and self._queued < QUEUE_HIGH // 2 and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return ev

    def ready(self) -> bool:
        """An event is queued: next_event() returns without waiting."""
        return bool(self._events)

    def write(self, data: bytes) -> None:
        if self.closed or self.transport is None or self.transport.is_closing():
            raise ChannelClosed("the peer closed the connection")
        self.bytes_out += len(data)
        self.transport.write(data)

    def write_many(self, chunks: list[bytes]) -> None:
        """Several pieces in one send (a response head and the body that came
        with it): one syscall where separate writes cost one each."""
        if not chunks:
            return
        if self.closed or self.transport is None or self.transport.is_closing():
            raise ChannelClosed("the peer closed the connection")
        self.bytes_out += sum(map(len, chunks))
        self.transport.writelines(chunks)

    async def drain(self) -> None:
        await self._writable.wait()
        if self.closed:
            raise ChannelClosed("the peer closed the connection")

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            reset(self.transport)
