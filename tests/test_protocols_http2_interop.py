"""The HTTP/2 codec against real implementations over loopback TCP: curl, grpcio and (when
installed) h2load as clients of a small server built on a server-side H2Endpoint, and a
client-side H2Endpoint calling a real grpcio server. No root; skipped tools say why."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from dataplane.protocols.http2 import (
    Data,
    Event,
    H2Endpoint,
    ProtocolViolation,
    RequestHeaders,
    ResponseHeaders,
    StreamReset,
    Trailers,
    grpc_status,
    is_grpc,
)

BIG = bytes(range(256)) * 32768  # 8 MiB: many times every window, so flow control must work
NO_PROXY_ENV = {k: v for k, v in os.environ.items()
                if k.lower() not in ("http_proxy", "https_proxy", "grpc_proxy", "all_proxy")}


def grpc_frame(payload: bytes) -> bytes:
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


class _ServerConnection(asyncio.Protocol):
    """A test origin on H2Endpoint: echo for gRPC, a few fixed HTTP answers, flow control honoured."""

    window_waits = 0  # sends the peer's window cut short: proof the flow-control path ran

    def __init__(self) -> None:
        self.h2 = H2Endpoint(False)
        self.requests: dict[int, tuple[tuple[tuple[bytes, bytes], ...], bytearray]] = {}
        self.outbox: dict[int, tuple[memoryview, list[tuple[str, str]]]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.transport.write(self.h2.initiate())

    def data_received(self, data: bytes) -> None:
        for event in self.h2.receive(data):
            self._handle(event)
        self._flush()
        self.transport.write(self.h2.data_to_send())
        if self.h2.closed:
            self.transport.close()

    def _handle(self, event: Event) -> None:
        if isinstance(event, RequestHeaders):
            self.requests[event.stream_id] = (event.headers, bytearray())
            if event.end_stream:
                self._respond(event.stream_id)
        elif isinstance(event, Data):
            self.requests[event.stream_id][1].extend(event.data)
            self.h2.acknowledge(event.stream_id, event.flow_controlled_length)  # consumed at once
            if event.end_stream:
                self._respond(event.stream_id)
        elif isinstance(event, Trailers):
            self._respond(event.stream_id)
        elif isinstance(event, StreamReset):
            self.requests.pop(event.stream_id, None)
            self.outbox.pop(event.stream_id, None)
        elif isinstance(event, ProtocolViolation):
            self.outbox.clear()

    def _respond(self, sid: int) -> None:
        headers, body = self.requests.pop(sid)
        path = dict(headers)[b":path"]
        if is_grpc(headers):
            if path.endswith(b"/Fail"):  # trailers-only, as gRPC servers answer errors
                self.h2.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc"),
                                           ("grpc-status", "5"), ("grpc-message", "no%20such%20thing")],
                                     end_stream=True)
                return
            payload = bytes(body[5:5 + int.from_bytes(body[1:5], "big")])
            self.h2.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
            trailers = [("grpc-status", "0"), ("x-served-by", "nodemesh-h2")]
            self._queue(sid, grpc_frame(payload[::-1]), trailers)
        elif path == b"/big":
            self.h2.send_headers(sid, [(":status", "200"), ("content-length", str(len(BIG)))])
            self._queue(sid, BIG, [])
        else:
            answer = f"{len(body)} {hashlib.sha256(body).hexdigest()}\n".encode()
            self.h2.send_headers(sid, [(":status", "200"), ("content-type", "text/plain")])
            self._queue(sid, answer, [])

    def _queue(self, sid: int, body: bytes, trailers: list[tuple[str, str]]) -> None:
        self.outbox[sid] = (memoryview(body), trailers)

    def _flush(self) -> None:
        for sid, (rest, trailers) in list(self.outbox.items()):
            n = self.h2.send_data(sid, rest, end_stream=not trailers)
            if n < len(rest):
                type(self).window_waits += 1
                self.outbox[sid] = (rest[n:], trailers)  # the rest on WindowOpened
                continue
            if trailers:
                self.h2.send_trailers(sid, trailers)
            del self.outbox[sid]


@pytest.fixture
def origin() -> Iterator[int]:
    """The test origin on a loopback port, served from an event loop in a thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(
        loop.create_server(_ServerConnection, "127.0.0.1", 0), loop).result(5)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        loop.call_soon_threadsafe(server.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def curl(*args: str, stdin: bytes | None = None) -> bytes:
    return subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "--noproxy", "*", "--max-time", "30",
                           *args], input=stdin, capture_output=True, check=True, env=NO_PROXY_ENV).stdout


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_downloads_a_large_body_byte_exact(origin: int) -> None:
    got = curl(f"http://127.0.0.1:{origin}/big")
    assert len(got) == len(BIG) and hashlib.sha256(got).digest() == hashlib.sha256(BIG).digest()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_uploads_a_large_body_byte_exact(origin: int) -> None:
    body = os.urandom(3 << 20)
    got = curl("-H", "Expect:", "--data-binary", "@-", f"http://127.0.0.1:{origin}/upload", stdin=body)
    assert got == f"{len(body)} {hashlib.sha256(body).hexdigest()}\n".encode()


@pytest.mark.skipif(shutil.which("h2load") is None,
                    reason="h2load not installed: it comes with the Debian package nghttp2-client")
def test_h2load_multiplexed_requests_all_succeed(origin: int) -> None:
    out = subprocess.run(["h2load", "-n", "600", "-c", "3", "-m", "20", f"http://127.0.0.1:{origin}/"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    assert "600 succeeded, 0 failed, 0 errored" in out, out


def test_grpcio_client_unary_calls_and_error_status(origin: int) -> None:
    options = [("grpc.enable_http_proxy", 0), ("grpc.max_receive_message_length", 16 << 20),
               ("grpc.max_send_message_length", 16 << 20)]
    with grpc.insecure_channel(f"127.0.0.1:{origin}", options=options) as channel:
        say = channel.unary_unary("/echo.Echo/Say")
        reply, call = say.with_call(b"hello, mesh", timeout=10)
        assert reply == b"hsem ,olleh"
        assert ("x-served-by", "nodemesh-h2") in call.trailing_metadata()
        # Larger than grpcio's 4 MiB windows both ways: each side must wait for the other's credit.
        waits_before = _ServerConnection.window_waits
        big = os.urandom(6 << 20)
        assert say(big, timeout=20) == big[::-1]
        assert _ServerConnection.window_waits > waits_before
        with pytest.raises(grpc.RpcError) as failure:
            channel.unary_unary("/echo.Echo/Fail")(b"", timeout=10)
        assert failure.value.code() == grpc.StatusCode.NOT_FOUND
        assert failure.value.details() == "no such thing"


@pytest.fixture
def grpc_origin() -> Iterator[int]:
    """A real grpcio server: Say echoes reversed with trailing metadata, Missing fails NOT_FOUND."""
    def say(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.set_trailing_metadata([("x-echo-length", str(len(request)))])
        return request[::-1]

    def missing(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.NOT_FOUND, "nothing here")

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("echo.Echo", {
        "Say": grpc.unary_unary_rpc_method_handler(say),
        "Missing": grpc.unary_unary_rpc_method_handler(missing),
    })])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(0)


def call_over_socket(port: int, path: str, message: bytes) -> list[Event]:
    """One unary gRPC call from a client-side H2Endpoint over a blocking socket."""
    h2 = H2Endpoint(True)
    events: list[Event] = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(h2.initiate())
        sid = h2.new_stream_id()
        h2.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":authority", f"127.0.0.1:{port}"),
                              (":path", path), ("content-type", "application/grpc"), ("te", "trailers")])
        assert h2.send_data(sid, grpc_frame(message), end_stream=True) == len(message) + 5
        sock.sendall(h2.data_to_send())
        while not any(isinstance(e, Trailers | StreamReset) or getattr(e, "end_stream", False)
                      for e in events if getattr(e, "stream_id", None) == sid):
            data = sock.recv(65536)
            assert data, "the server closed the connection mid-call"
            for event in h2.receive(data):
                events.append(event)
                if isinstance(event, Data):
                    h2.acknowledge(event.stream_id, event.flow_controlled_length)
            sock.sendall(h2.data_to_send())
        h2.close()
        sock.sendall(h2.data_to_send())
    return events


def test_client_endpoint_calls_a_real_grpc_server(grpc_origin: int) -> None:
    message = b"\x0a\x04mesh" * 1000
    events = call_over_socket(grpc_origin, "/echo.Echo/Say", message)
    head = next(e for e in events if isinstance(e, ResponseHeaders))
    assert is_grpc(head.headers) and dict(head.headers)[b":status"] == b"200"
    body = b"".join(e.data for e in events if isinstance(e, Data))
    assert body == grpc_frame(message[::-1])
    trailers = next(e for e in events if isinstance(e, Trailers)).headers
    assert grpc_status(trailers) == 0 and (b"x-echo-length", str(len(message)).encode()) in trailers


def test_client_endpoint_sees_a_real_grpc_error_status(grpc_origin: int) -> None:
    events = call_over_socket(grpc_origin, "/echo.Echo/Missing", b"")
    final = [e for e in events if isinstance(e, ResponseHeaders | Trailers)][-1]
    assert grpc_status(final.headers) == grpc.StatusCode.NOT_FOUND.value[0]
    assert (b"grpc-message", b"nothing here") in final.headers
