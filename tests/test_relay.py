"""The L4 forwarding engines that need no BPF, on loopback (no root): the
userspace relay and the splice(2) engine, each for exact bytes both ways,
half-close, bytes read before the engine took over, reset propagation and
backpressure. Real sockets, uvloop, no mocks."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
from collections.abc import Awaitable, Callable

import pytest
import uvloop

from dataplane.flows import FlowTable
from dataplane.pipe_splice import PipeSplicer
from dataplane.relay import HIGH_WATER, RelaySide

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
ENGINES = ("relay", "splice")


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class _Engines:
    """What the engine under test saw, for assertions after the traffic."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.flows = FlowTable()
        self.splicer = PipeSplicer(on_done=self.flows.close) if name == "splice" else None


async def _relay_to(port: int, sides: list[RelaySide],
                    engines: _Engines | None = None) -> asyncio.AbstractServer:
    loop = asyncio.get_running_loop()

    def factory() -> RelaySide:
        down = RelaySide(on_bytes=lambda n: None)
        sides.append(down)

        async def connect() -> None:
            assert down.transport is not None
            down.transport.pause_reading()
            up = RelaySide(on_bytes=lambda n: None)
            sides.append(up)
            await loop.create_connection(lambda: up, "127.0.0.1", port)
            if engines is not None and engines.splicer is not None:
                flow = engines.flows.open(pod="test/client", pod_ip=None, client="-",
                                          original_dst="-")
                if await engines.splicer.start(flow, down, up):
                    return
            down.link(up)
            up.link(down)
            down.transport.resume_reading()

        loop.call_soon(lambda: loop.create_task(connect()))
        return down

    return await loop.create_server(factory, "127.0.0.1", 0)


def run(coro_fn: Callable[[], Awaitable[None]]) -> None:
    uvloop.run(asyncio.wait_for(coro_fn(), 60))


async def _echo_with_trailer(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    n = 0
    while chunk := await r.read(65536):
        n += len(chunk)
        w.write(chunk)
        await w.drain()
    w.write(f"bye {n}\n".encode())
    await w.drain()
    w.close()


async def _pair(handler: Handler, engines: _Engines | None = None) -> tuple[
        asyncio.AbstractServer, asyncio.AbstractServer, int, list[RelaySide]]:
    upstream = await asyncio.start_server(handler, "127.0.0.1", 0)
    sides: list[RelaySide] = []
    relay = await _relay_to(upstream.sockets[0].getsockname()[1], sides, engines)
    return upstream, relay, relay.sockets[0].getsockname()[1], sides


def test_bytes_are_exact_both_ways_and_half_close_is_forwarded(engine: str) -> None:
    engines = _Engines(engine)

    async def main() -> None:
        upstream, relay, port, _ = await _pair(_echo_with_trailer, engines)
        size = 16 << 20

        async def flow() -> None:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            sent, back = hashlib.sha256(), bytearray()

            async def send() -> None:
                for _ in range(size // (1 << 20)):
                    chunk = os.urandom(1 << 20)
                    sent.update(chunk)
                    w.write(chunk)
                    await w.drain()
                w.write_eof()

            async def recv() -> None:
                while chunk := await r.read(1 << 18):
                    back.extend(chunk)

            await asyncio.gather(send(), recv())
            assert hashlib.sha256(back[:size]).digest() == sent.digest()
            assert bytes(back[size:]) == f"bye {size}\n".encode()
            w.close()

        gc.collect()  # earlier tests' unreachable sockets are closed now, not mid-test
        fds = len(os.listdir("/proc/self/fd"))
        await asyncio.gather(*(flow() for _ in range(4)))
        await asyncio.sleep(0.1)  # the relay's transports close on the next loop turns
        assert len(os.listdir("/proc/self/fd")) <= fds  # no socket or pipe left open
        relay.close()
        upstream.close()

    run(main)
    if engines.splicer is not None:
        assert engines.splicer.stats["spliced"] == 4, engines.splicer.stats
        assert not engines.splicer.active and len(engines.flows) == 0  # every flow ended


def test_bytes_read_before_the_engine_took_over_keep_their_order(engine: str) -> None:
    """A server that greets first and a client that writes at once: both early
    chunks are read in user space before the engine starts, and must come out
    ahead of everything that follows, on both sides."""
    engines = _Engines(engine)

    async def greeter(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"HELLO\n")
        await w.drain()
        got = bytearray()
        while chunk := await r.read(65536):
            got.extend(chunk)
        w.write(hashlib.sha256(got).hexdigest().encode())
        w.close()

    async def main() -> None:
        upstream, relay, port, _ = await _pair(greeter, engines)
        payload = b"first!" + os.urandom(3 << 20)
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(payload)  # before the upstream connection exists
        await w.drain()
        w.write_eof()
        answer = await r.read()
        assert answer == b"HELLO\n" + hashlib.sha256(payload).hexdigest().encode()
        w.close()
        relay.close()
        upstream.close()

    run(main)
    if engines.splicer is not None:
        assert engines.splicer.stats["spliced"] == 1, engines.splicer.stats


def test_upstream_reset_resets_the_client(engine: str) -> None:
    engines = _Engines(engine)

    async def rude(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readexactly(5)
        sock = w.get_extra_info("socket")
        import socket
        import struct
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        w.transport.abort()

    async def main() -> None:
        upstream, relay, port, _ = await _pair(rude, engines)
        r, w = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.sleep(0.2)  # the engine has taken the flow over
        w.write(b"hello")
        with pytest.raises(ConnectionResetError):
            data = await r.read(10)
            assert data == b""  # a plain FIN would land here: that is the failure
            raise AssertionError("expected a reset, got a clean close")
        w.close()
        relay.close()
        upstream.close()

    run(main)
    if engines.splicer is not None:
        assert engines.splicer.stats == {**engines.splicer.stats, "spliced": 1, "reset": 1}


def test_slow_reader_applies_backpressure_to_the_sender() -> None:
    """A client that does not read must not make the relay buffer without bound."""
    total = 64 << 20

    async def firehose(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        chunk = b"x" * (1 << 20)
        for _ in range(total // len(chunk)):
            w.write(chunk)
            await w.drain()
        w.close()

    async def main() -> None:
        upstream, relay, port, sides = await _pair(firehose)
        r, w = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.sleep(1.0)  # not reading: kernel buffers fill, then the relay's
        down = sides[0]
        assert down.transport is not None
        buffered = down.transport.get_write_buffer_size()
        assert buffered <= HIGH_WATER + (4 << 20), buffered
        got = 0
        while chunk := await r.read(1 << 20):
            got += len(chunk)
        assert got == total
        w.close()
        relay.close()
        upstream.close()

    run(main)


def test_splice_engine_waits_for_a_slow_reader_then_delivers_everything() -> None:
    """With a client that does not read, the engine stops splicing (the bytes the
    server got rid of stay within the kernel's socket buffers), then delivers
    every byte once the client reads: the wait-for-writable path resumes."""
    total = 256 << 20
    written = [0]
    engines = _Engines("splice")

    async def firehose(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        chunk = b"x" * (1 << 20)
        for _ in range(total // len(chunk)):
            w.write(chunk)
            await w.drain()
            written[0] += len(chunk)
        w.close()

    async def main() -> None:
        upstream, relay, port, _ = await _pair(firehose, engines)
        r, w = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.sleep(1.0)
        # server sndbuf + proxy rcvbuf + pipe + proxy sndbuf + client rcvbuf, each a few MiB
        assert written[0] <= 48 << 20, written[0]
        got = 0
        while chunk := await r.read(1 << 20):
            got += len(chunk)
        assert got == total
        w.close()
        relay.close()
        upstream.close()

    run(main)
    assert engines.splicer is not None and engines.splicer.stats["spliced"] == 1


def test_urgent_data_neither_stalls_nor_loses_the_bytes_after_it(engine: str) -> None:
    """TCP urgent data (MSG_OOB) stops splice(2) at the urgent mark; the flow must
    carry on past it, as the relay does (both step over the urgent byte), and the
    bytes after it must not be lost when the client's FIN follows."""
    import socket as so
    import time

    engines = _Engines(engine)

    async def collect(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(await r.read(-1))  # all of it, after the client's EOF
        await w.drain()
        w.close()

    def client(port: int) -> bytes:
        with so.create_connection(("127.0.0.1", port), timeout=10) as c:
            c.sendall(b"before")
            time.sleep(0.3)  # the engine has taken the flow over
            c.send(b"!", so.MSG_OOB)
            c.sendall(b"after")
            time.sleep(0.3)
            c.shutdown(so.SHUT_WR)
            out = b""
            while chunk := c.recv(65536):
                out += chunk
            return out

    async def main() -> None:
        upstream, relay, port, _ = await _pair(collect, engines)
        assert await asyncio.to_thread(client, port) == b"beforeafter"
        relay.close()
        upstream.close()

    run(main)


def test_splice_engine_out_of_descriptors_keeps_relaying() -> None:
    """With no descriptors left for its pipes, the engine leaves the flow to the
    relay (nothing changed hands): exact bytes, no traceback, nothing leaked."""
    import resource

    engines = _Engines("splice")

    async def main() -> None:
        upstream, relay, port, _ = await _pair(_echo_with_trailer, engines)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        # The limit caps descriptor numbers, not counts: fill the holes below the
        # highest open one first, so that exactly the room below is left.
        top = max(int(fd) for fd in os.listdir("/proc/self/fd"))
        fillers = []
        while (fd := os.open("/dev/null", os.O_RDONLY)) < top:
            fillers.append(fd)
        os.close(fd)
        # room for the client, the accepted and the upstream sockets and the
        # server's side, not for the engine's pipes and duplicates
        resource.setrlimit(resource.RLIMIT_NOFILE, (top + 1 + 5, hard))
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"x" * 100000)
            w.write_eof()
            back = await r.read(-1)
            w.close()
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            for fd in fillers:
                os.close(fd)
        assert back == b"x" * 100000 + b"bye 100000\n"
        relay.close()
        upstream.close()

    run(main)
    assert engines.splicer is not None
    assert engines.splicer.stats["spliced"] == 0 and engines.splicer.stats["fallback"] == 1
