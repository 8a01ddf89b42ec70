"""The HTTP/2 codec (dataplane/protocols/http2.py), endpoints wired back to back in memory:
requests and responses with trailers, concurrent streams, end-to-end flow control with exact
byte counts, resets, GOAWAY, header hygiene and gRPC framing through a proxy. Unit: no
sockets, no root."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import pytest
from hyperframe.frame import GoAwayFrame

from dataplane.protocols.http2 import (
    CannotOpenStream,
    Data,
    ErrorCodes,
    Event,
    GoAway,
    H2Endpoint,
    Headers,
    ProtocolViolation,
    RequestHeaders,
    ResponseHeaders,
    StreamReset,
    Trailers,
    WindowOpened,
    from_h2_headers,
    grpc_status,
    is_grpc,
    to_h2_headers,
)

GRPC_REQUEST = [(":method", "POST"), (":scheme", "http"), (":authority", "greeter.shop:50051"),
                (":path", "/helloworld.Greeter/SayHello"), ("content-type", "application/grpc"),
                ("te", "trailers"), ("grpc-timeout", "1S")]
GRPC_RESPONSE = [(":status", "200"), ("content-type", "application/grpc")]


def request(path: str = "/", method: str = "POST") -> list[tuple[str, str]]:
    return [(":method", method), (":scheme", "http"), (":authority", "svc.ns:80"), (":path", path)]


def grpc_frame(payload: bytes, compressed: bool = False) -> bytes:
    """One gRPC length-prefixed message: compressed flag, 4-byte big-endian length, payload."""
    return bytes([compressed]) + len(payload).to_bytes(4, "big") + payload


class Wire:
    """A client-side and a server-side endpoint joined by an in-memory pipe."""

    def __init__(self, client: dict[str, Any] | None = None, server: dict[str, Any] | None = None) -> None:
        self.client = H2Endpoint(True, **(client or {}))
        self.server = H2Endpoint(False, **(server or {}))
        self.server_events: list[Event] = self.server.receive(self.client.initiate())
        self.client_events: list[Event] = self.client.receive(self.server.initiate())
        self.pump()
        self.take()

    def pump(self) -> None:
        while True:
            to_server, to_client = self.client.data_to_send(), self.server.data_to_send()
            if not to_server and not to_client:
                return
            if to_server:
                self.server_events += self.server.receive(to_server)
            if to_client:
                self.client_events += self.client.receive(to_client)

    def take(self) -> tuple[list[Event], list[Event]]:
        """(client events, server events) since the last take, after pumping."""
        self.pump()
        taken = self.client_events, self.server_events
        self.client_events, self.server_events = [], []
        return taken


def body_of(events: list[Event], stream_id: int) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Data) and e.stream_id == stream_id)


def received(events: list[Event], stream_id: int) -> int:
    return sum(e.flow_controlled_length for e in events if isinstance(e, Data) and e.stream_id == stream_id)


def of_type(events: list[Event], kind: type) -> list[Any]:
    return [e for e in events if isinstance(e, kind)]


def test_request_and_response_round_trip_with_grpc_trailers() -> None:
    w = Wire()
    sid = w.client.new_stream_id()
    w.client.send_headers(sid, GRPC_REQUEST)
    assert w.client.send_data(sid, b"hello", end_stream=True) == 5
    _, got = w.take()
    assert got[0] == RequestHeaders(sid, to_h2_headers(GRPC_REQUEST), end_stream=False)
    assert got[1:] == [Data(sid, b"hello", 5, end_stream=True)]
    assert is_grpc(got[0].headers)

    w.server.acknowledge(sid, 5)
    w.server.send_headers(sid, GRPC_RESPONSE)
    w.server.send_data(sid, b"world")
    w.server.send_trailers(sid, [("grpc-status", "0"), ("grpc-message", "ok")])
    got, _ = w.take()
    assert got == [ResponseHeaders(sid, to_h2_headers(GRPC_RESPONSE), end_stream=False),
                   Data(sid, b"world", 5, end_stream=False),
                   Trailers(sid, ((b"grpc-status", b"0"), (b"grpc-message", b"ok")))]
    assert grpc_status(got[-1].headers) == 0
    assert w.client.open_streams == w.server.open_streams == 0


def test_headers_only_request_and_trailers_only_grpc_error() -> None:
    w = Wire()
    sid = w.client.new_stream_id()
    w.client.send_headers(sid, request("/healthz", "GET"), end_stream=True)
    _, got = w.take()
    assert got == [RequestHeaders(sid, to_h2_headers(request("/healthz", "GET")), end_stream=True)]
    # gRPC's trailers-only response: status in the one HEADERS frame, which ends the stream.
    w.server.send_headers(sid, GRPC_RESPONSE + [("grpc-status", "5"), ("grpc-message", "not%20found")],
                          end_stream=True)
    got, _ = w.take()
    assert isinstance(got[0], ResponseHeaders) and got[0].end_stream and len(got) == 1
    assert grpc_status(got[0].headers) == 5


def test_many_concurrent_streams_interleave_and_stay_apart() -> None:
    w = Wire()
    streams = []
    for _ in range(50):
        sid = w.client.new_stream_id()
        w.client.send_headers(sid, request(f"/item/{sid}"))
        streams.append(sid)
    for round_ in range(4):  # every stream sends a chunk per round: the frames interleave on the wire
        for sid in streams:
            w.client.send_data(sid, f"<{sid}:{round_}>".encode(), end_stream=round_ == 3)
    _, got = w.take()
    assert [e.stream_id for e in of_type(got, RequestHeaders)] == streams
    order = [e.stream_id for e in of_type(got, Data)]
    assert order[:2] == [streams[0], streams[1]]  # interleaved, not one stream after another
    for sid in streams:
        assert body_of(got, sid) == b"".join(f"<{sid}:{r}>".encode() for r in range(4))
        w.server.acknowledge(sid, received(got, sid))
    for sid in reversed(streams):  # answers in another order than the requests
        w.server.send_headers(sid, [(":status", "200")])
        w.server.send_data(sid, f"answer {sid}".encode(), end_stream=True)
    got, _ = w.take()
    for sid in streams:
        assert body_of(got, sid) == f"answer {sid}".encode()
    assert w.client.open_streams == 0


def test_flow_control_stops_the_sender_at_the_window_until_the_receiver_acknowledges() -> None:
    window = 32768
    w = Wire(server={"stream_window": window})
    sid = w.client.new_stream_id()
    w.client.send_headers(sid, request("/upload"))
    body = bytes(range(256)) * 400  # 102400 bytes
    sent = w.client.send_data(sid, body)
    assert sent == window  # exactly the window the server advertised
    _, got = w.take()
    assert received(got, sid) == window and body_of(got, sid) == body[:window]
    # The server has not acknowledged (the proxy did not forward it): nothing more fits.
    assert w.client.max_outbound(sid) == 0
    assert w.client.send_data(sid, body[sent:]) == 0
    assert w.take() == ([], [])

    w.server.acknowledge(sid, 10000)  # part of it forwarded
    got, _ = w.take()
    assert got == [WindowOpened(sid)]
    assert w.client.max_outbound(sid) == 10000
    assert w.client.send_data(sid, body[sent:]) == 10000
    sent += 10000
    _, got = w.take()
    assert received(got, sid) == 10000
    w.server.acknowledge(sid, 10 * window)  # more than is outstanding: only the outstanding counts
    w.take()
    assert w.client.max_outbound(sid) == window  # the whole window, not a byte more
    while sent < len(body):
        n = w.client.send_data(sid, body[sent:], end_stream=True)
        assert 0 < n <= window
        sent += n
        _, got = w.take()
        w.server.acknowledge(sid, received(got, sid))
        w.take()


def test_a_stalled_stream_holds_only_its_own_window_and_siblings_keep_flowing() -> None:
    w = Wire(server={"stream_window": 16384, "connection_window": 65536})
    slow = w.client.new_stream_id()
    w.client.send_headers(slow, request("/slow"))
    fast = w.client.new_stream_id()
    w.client.send_headers(fast, request("/fast"))
    assert w.client.send_data(slow, b"s" * 100_000) == 16384
    w.take()  # never acknowledged: its reader is stalled
    moved = 0
    for _ in range(10):
        n = w.client.send_data(fast, b"f" * 20_000)
        assert n > 0
        moved += n
        _, got = w.take()
        w.server.acknowledge(fast, received(got, fast))
        w.take()
    assert moved > 100_000  # more than the whole connection window went through the sibling
    assert w.client.max_outbound(slow) == 0


def test_reset_of_one_stream_leaves_the_others_alive_and_returns_its_window() -> None:
    w = Wire(server={"connection_window": 65536})
    ids = []
    for _ in range(3):
        sid = w.client.new_stream_id()
        w.client.send_headers(sid, request(f"/{sid}"))
        ids.append(sid)
    a, b, c = ids
    assert w.client.send_data(b, b"x" * 40000) == 40000
    w.take()  # the server got b's bytes and never forwards them
    assert w.client.max_outbound(0) == 65536 - 40000

    w.client.reset(b, ErrorCodes.CANCEL)
    client_got, server_got = w.take()
    assert server_got == [StreamReset(b, ErrorCodes.CANCEL)]
    assert client_got == [WindowOpened(0)]
    # b's unacknowledged bytes went back to the connection window when it was reset.
    assert w.client.max_outbound(0) == 65536
    assert w.client.send_data(b, b"late") == 0  # a reset stream takes nothing, without raising

    for sid in (a, c):
        w.client.send_data(sid, b"body", end_stream=True)
    _, server_got = w.take()
    assert body_of(server_got, a) == body_of(server_got, c) == b"body"
    w.server.reset(a, ErrorCodes.INTERNAL_ERROR)  # the server side may reset too
    w.server.send_headers(c, [(":status", "204")], end_stream=True)
    client_got, _ = w.take()
    assert client_got == [StreamReset(a, ErrorCodes.INTERNAL_ERROR),
                          ResponseHeaders(c, ((b":status", b"204"),), end_stream=True)]
    assert not w.client.closed and not w.server.closed


def test_goaway_is_reported_with_last_stream_id_and_closes_the_connection() -> None:
    w = Wire()
    for _ in range(2):
        sid = w.client.new_stream_id()
        w.client.send_headers(sid, request(), end_stream=True)
    w.take()
    w.server.close(ErrorCodes.NO_ERROR)
    assert w.server.closed
    got, _ = w.take()
    assert got == [GoAway(last_stream_id=3, error_code=ErrorCodes.NO_ERROR)]
    assert not w.client.can_open_stream
    with pytest.raises(CannotOpenStream, match="GOAWAY"):
        w.client.new_stream_id()


def test_graceful_goaway_lets_streams_below_it_finish_and_refuses_the_rest() -> None:
    w = Wire()
    ids = []
    for _ in range(3):
        sid = w.client.new_stream_id()
        w.client.send_headers(sid, request(), end_stream=True)
        ids.append(sid)
    w.take()
    # The upstream shuts down: it will finish stream 3 but never processed stream 5. Its GOAWAY
    # and its answers on the finished streams arrive in one read.
    goaway = GoAwayFrame(0, last_stream_id=3, error_code=0).serialize()
    for sid in ids[:2]:
        w.server.send_headers(sid, [(":status", "200")])
        w.server.send_data(sid, b"done", end_stream=True)
    got = w.client.receive(goaway + w.server.data_to_send())
    assert got[:2] == [GoAway(3, ErrorCodes.NO_ERROR), StreamReset(5, ErrorCodes.REFUSED_STREAM)]
    assert [body_of(got, sid) for sid in ids[:2]] == [b"done", b"done"]
    assert not w.client.closed and w.client.open_streams == 0
    assert not w.client.can_open_stream
    w.client.close()
    _, server_got = w.take()
    assert of_type(server_got, StreamReset) == [StreamReset(5, ErrorCodes.REFUSED_STREAM)]
    assert of_type(server_got, GoAway) == [GoAway(0, ErrorCodes.NO_ERROR)]


def test_hop_by_hop_headers_are_dropped_on_send() -> None:
    # What an HTTP/1.1 request may carry into the proxy.
    h1 = [("Host", "svc.ns"), (":method", "GET"), ("Connection", "keep-alive, X-Hop"), (":scheme", "http"),
          ("Keep-Alive", "timeout=5"), ("Transfer-Encoding", "chunked"), ("Upgrade", "h2c"),
          ("HTTP2-Settings", "AAMAAABkAAQAAP__"), ("Proxy-Connection", "keep-alive"), ("X-Hop", "1"),
          (":path", "/"), ("TE", "gzip, trailers"), ("X-Kept", "yes")]
    clean = to_h2_headers(h1)
    assert clean == ((b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b"host", b"svc.ns"),
                     (b"x-kept", b"yes"), (b"te", b"trailers"))
    assert to_h2_headers([("te", "gzip")]) == ()  # HTTP/2 allows te only as "trailers"

    w = Wire()
    sid = w.client.new_stream_id()
    w.client.send_headers(sid, h1, end_stream=True)
    _, got = w.take()
    assert got == [RequestHeaders(sid, clean, end_stream=True)]


def test_hop_by_hop_headers_received_are_a_protocol_violation() -> None:
    import h2.config
    import h2.connection

    # A sloppy peer: plain h2 with its own header checks switched off.
    peer = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, header_encoding=None, validate_outbound_headers=False,
        normalize_outbound_headers=False))
    peer.initiate_connection()
    peer.send_headers(1, request() + [("connection", "keep-alive")], end_stream=True)
    server = H2Endpoint(False)
    hello = server.initiate()
    got = server.receive(peer.data_to_send())
    assert len(got) == 1 and isinstance(got[0], ProtocolViolation)
    assert got[0].error_code == ErrorCodes.PROTOCOL_ERROR and "connection" in got[0].reason.lower()
    assert server.closed and server.receive(b"anything") == []
    farewell = peer.receive_data(hello + server.data_to_send())
    assert any(type(e).__name__ == "ConnectionTerminated" and e.error_code == ErrorCodes.PROTOCOL_ERROR
               for e in farewell)


def test_grpc_helpers() -> None:
    for content_type, expected in [("application/grpc", True), ("application/grpc+proto", True),
                                   ("Application/GRPC;charset=utf-8", True), ("application/grpc-web", False),
                                   ("application/json", False)]:
        assert is_grpc(to_h2_headers([("content-type", content_type)])) is expected
    assert not is_grpc(())
    assert grpc_status(((b"grpc-status", b"14"),)) == 14
    assert grpc_status(((b"grpc-status", b"oops"),)) is None and grpc_status(()) is None
    assert from_h2_headers([("a", "b"), (b"c", b"d")]) == ((b"a", b"b"), (b"c", b"d"))


def test_server_side_endpoint_opens_no_streams() -> None:
    w = Wire()
    assert not w.server.can_open_stream
    with pytest.raises(CannotOpenStream, match="server-side"):
        w.server.new_stream_id()


def test_client_respects_the_peers_concurrency_limit() -> None:
    w = Wire(server={"max_concurrent_streams": 2})
    for _ in range(2):
        w.client.send_headers(w.client.new_stream_id(), request())
    assert not w.client.can_open_stream
    with pytest.raises(CannotOpenStream, match="2 concurrent"):
        w.client.new_stream_id()


# Through a proxy: downstream client -> [server-side endpoint | proxy | client-side endpoint] -> upstream.

class MiniProxy:
    """The forwarding loop the node proxy runs, reduced to its flow-control essentials: a stream's
    bytes are acknowledged to the sender only once the other side took them."""

    def __init__(self, down: H2Endpoint, up: H2Endpoint) -> None:
        self.down, self.up = down, up
        self.to_up: dict[int, int] = {}  # downstream stream -> upstream stream
        self.to_down: dict[int, int] = {}
        # per (endpoint to send on, stream): [bytes not yet taken, flow-controlled length to ack, end]
        self.pending: dict[tuple[int, int], list[Any]] = defaultdict(lambda: [b"", 0, False])

    def held(self) -> int:
        return sum(len(p[0]) for p in self.pending.values())

    def on_downstream(self, events: list[Event]) -> None:
        for e in events:
            if isinstance(e, RequestHeaders):
                sid = self.up.new_stream_id()
                self.to_up[e.stream_id], self.to_down[sid] = sid, e.stream_id
                self.up.send_headers(sid, e.headers, e.end_stream)
            else:
                self._forward(e, self.up, self.down, self.to_up)

    def on_upstream(self, events: list[Event]) -> None:
        for e in events:
            if isinstance(e, ResponseHeaders):
                self.down.send_headers(self.to_down[e.stream_id], e.headers, e.end_stream)
            else:
                self._forward(e, self.down, self.up, self.to_down)

    def _forward(self, e: Event, out: H2Endpoint, src: H2Endpoint, ids: dict[int, int]) -> None:
        if isinstance(e, Data):
            p = self.pending[(id(out), e.stream_id)]
            p[0] += e.data
            p[1] += e.flow_controlled_length
            p[2] = e.end_stream
            self._flush(out, src, ids, e.stream_id)
        elif isinstance(e, Trailers):
            out.send_trailers(ids[e.stream_id], e.headers)
        elif isinstance(e, StreamReset):
            out.reset(ids[e.stream_id], e.error_code)
        elif isinstance(e, WindowOpened):  # the window to send on `src` opened: flush toward it
            for key in [k for k in self.pending if k[0] == id(src)]:
                back = {v: k for k, v in ids.items()}
                self._flush(src, out, back, key[1])

    def _flush(self, out: H2Endpoint, src: H2Endpoint, ids: dict[int, int], sid: int) -> None:
        p = self.pending[(id(out), sid)]
        n = out.send_data(ids[sid], p[0], end_stream=p[2])
        if n == len(p[0]):  # all of it went (with the end of the stream, if that came)
            src.acknowledge(sid, p[1])  # padding included
            del self.pending[(id(out), sid)]
        elif n:
            p[0], p[1] = p[0][n:], p[1] - n
            src.acknowledge(sid, n)


class Chain:
    """client -> proxy downstream endpoint, proxy upstream endpoint -> server, all in memory."""

    def __init__(self, window: int = 65535) -> None:
        kw = {"stream_window": window, "connection_window": 4 * window}
        self.client, self.server = H2Endpoint(True, **kw), H2Endpoint(False, **kw)
        self.proxy = MiniProxy(H2Endpoint(False, **kw), H2Endpoint(True, **kw))
        self.client_events: list[Event] = []
        self.server_events: list[Event] = []
        self.proxy.on_downstream(self.proxy.down.receive(self.client.initiate()))
        self.client_events += self.client.receive(self.proxy.down.initiate())
        self.server_events += self.server.receive(self.proxy.up.initiate())
        self.proxy.on_upstream(self.proxy.up.receive(self.server.initiate()))
        self.pump()

    def server_reads(self) -> None:
        """The server application consumes all it received so far."""
        for sid in {e.stream_id for e in of_type(self.server_events, Data)}:
            self.server.acknowledge(sid, received(self.server_events, sid))  # capped at what is owed
        self.pump()

    def pump(self) -> None:
        moved = True
        while moved:
            moved = False
            for src, dst, sink in ((self.client, self.proxy.down, self.proxy.on_downstream),
                                   (self.proxy.down, self.client, self.client_events.extend),
                                   (self.proxy.up, self.server, self.server_events.extend),
                                   (self.server, self.proxy.up, self.proxy.on_upstream)):
                data = src.data_to_send()
                if data:
                    moved = True
                    sink(dst.receive(data))


def test_unary_grpc_message_passes_through_a_proxy_byte_exact_with_trailers() -> None:
    chain = Chain()
    message = grpc_frame(b"\x0a\x05world" + bytes(range(256)) * 300)  # a protobuf-ish payload, 76807 bytes
    sid = chain.client.new_stream_id()
    chain.client.send_headers(sid, GRPC_REQUEST)
    sent = 0
    while sent < len(message) or chain.proxy.held():
        if sent < len(message):
            sent += chain.client.send_data(sid, message[sent:], end_stream=True)
        chain.pump()
        chain.server_reads()
    request_head = of_type(chain.server_events, RequestHeaders)[0]
    assert request_head.headers == to_h2_headers(GRPC_REQUEST) and is_grpc(request_head.headers)
    up_sid = request_head.stream_id
    got = body_of(chain.server_events, up_sid)
    assert got == message and int.from_bytes(got[1:5], "big") == len(message) - 5
    assert of_type(chain.server_events, Data)[-1].end_stream

    reply = grpc_frame(b"\x0a\x0bhello world")
    chain.server.send_headers(up_sid, GRPC_RESPONSE)
    chain.server.send_data(up_sid, reply)
    chain.server.send_trailers(up_sid, [("grpc-status", "0"), ("grpc-message", "")])
    chain.pump()
    assert of_type(chain.client_events, ResponseHeaders)[0].headers == to_h2_headers(GRPC_RESPONSE)
    assert body_of(chain.client_events, sid) == reply
    trailers: Headers = of_type(chain.client_events, Trailers)[0].headers
    assert trailers == ((b"grpc-status", b"0"), (b"grpc-message", b""))
    assert grpc_status(trailers) == 0
    assert chain.proxy.held() == 0


def test_a_slow_upstream_throttles_the_client_through_the_proxy() -> None:
    window = 65535
    chain = Chain(window)
    sid = chain.client.new_stream_id()
    chain.client.send_headers(sid, request("/upload"))
    body = b"z" * (10 * window)
    sent = 0
    for _ in range(5):
        sent += chain.client.send_data(sid, body[sent:])
        chain.pump()
    # The server never acknowledges: it holds exactly one window, the proxy at most one more,
    # and the client is stopped. (The proxy credits the client as it forwards; h2 returns that
    # credit in batches of half a window, hence "at most".)
    up_sid = of_type(chain.server_events, RequestHeaders)[0].stream_id
    assert received(chain.server_events, up_sid) == window
    assert window // 2 <= chain.proxy.held() <= window
    assert sent == window + chain.proxy.held()  # nothing lost, nothing extra
    assert chain.client.max_outbound(sid) == 0 and chain.client.send_data(sid, body[sent:]) == 0

    # The server reads: everything flows to the end, byte-exact.
    while sent < len(body) or chain.proxy.held():
        if sent < len(body):
            sent += chain.client.send_data(sid, body[sent:], end_stream=True)
        chain.pump()
        chain.server_reads()
        assert chain.proxy.held() <= window
    assert body_of(chain.server_events, up_sid) == body
    assert of_type(chain.server_events, Data)[-1].end_stream


def test_a_reset_from_the_server_reaches_the_client_through_the_proxy() -> None:
    chain = Chain()
    sid = chain.client.new_stream_id()
    chain.client.send_headers(sid, request())
    chain.pump()
    up_sid = of_type(chain.server_events, RequestHeaders)[0].stream_id
    chain.server.reset(up_sid, ErrorCodes.REFUSED_STREAM)
    chain.pump()
    assert chain.client_events[-1] == StreamReset(sid, ErrorCodes.REFUSED_STREAM)


def test_data_in_flight_to_a_stream_the_receiver_reset_does_not_shrink_the_connection_window() -> None:
    w = Wire(server={"connection_window": 65536})
    sid = w.client.new_stream_id()
    w.client.send_headers(sid, request("/upload"))
    w.take()
    # The whole connection window, on the wire when the server resets: were it not credited
    # back, the connection would be stuck for every stream.
    assert w.client.send_data(sid, b"y" * 100_000) == 65536
    w.server.reset(sid, ErrorCodes.CANCEL)
    client_got, server_got = w.take()
    assert of_type(client_got, StreamReset) == [StreamReset(sid, ErrorCodes.CANCEL)]
    assert not of_type(server_got, Data)  # dropped by the receiver, not surfaced
    assert w.client.max_outbound(0) == 65536


def test_sends_to_a_stream_the_peer_already_reset_are_dropped_quietly() -> None:
    w = Wire()
    first = w.client.new_stream_id()
    w.client.send_headers(first, request(), end_stream=True)
    second = w.client.new_stream_id()
    w.client.send_headers(second, request(), end_stream=True)
    w.client.reset(first)
    _, got = w.take()
    # The proxy answers stream `first` before reading the reset that came in the same batch.
    assert [type(e) for e in got] == [RequestHeaders, RequestHeaders, StreamReset]
    w.server.send_headers(first, [(":status", "200")])
    assert w.server.send_data(first, b"too late", end_stream=True) == 0
    w.server.send_trailers(first, [("grpc-status", "0")])
    w.server.reset(first)
    assert w.server.max_outbound(first) == 0
    w.server.send_headers(second, [(":status", "200")], end_stream=True)
    got, _ = w.take()
    assert got == [ResponseHeaders(second, ((b":status", b"200"),), end_stream=True)]
