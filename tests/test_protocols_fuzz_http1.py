"""Property-based fuzzing of the HTTP/1.1 parsers: random bytes, truncations and mutations
of valid messages, cut at random places. Whatever comes in, out come only well-ordered
events or one ProtocolError, never another exception, and the cuts never change them."""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataplane.protocols.http1 import (
    Body,
    EndOfMessage,
    Event,
    ProtocolError,
    RequestHead,
    RequestParser,
    ResponseHead,
    ResponseParser,
    Upgraded,
)

REQUESTS = [
    b"GET /a?b=1 HTTP/1.1\r\nHost: svc\r\nAccept: */*\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /c HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;e=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\n",
    b"HEAD / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x00",
    b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n\x16\x03\x01",
    b"POST / HTTP/1.1\r\nHost: s\r\nConnection: Upgrade\r\nUpgrade: h2c\r\nContent-Length: 2\r\n\r\nhi",
    b"GET / HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n",
]
RESPONSES = [
    (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
    (b"GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nGrpc-Status: 0\r\n\r\n"),
    (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"),
    (b"GET", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"),
    (b"GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 7\r\n\r\n"),
    (b"CONNECT", b"HTTP/1.1 200 Connection established\r\n\r\n\x16\x03\x03"),
    (b"GET", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nws"),
    (b"GET", b"HTTP/1.0 200 OK\r\n\r\nto the end"),
]
INTERESTING = [b"\r\n", b"\n", b"\r", b" ", b"\t", b":", b";", b",", b"0", b"\x00", b"\xff",
               b"Content-Length: 3\r\n", b"Transfer-Encoding: chunked\r\n", b"\r\n\r\n", b"HTTP/1.1 "]
SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def mutated(draw: st.DrawFn, corpus: list[bytes]) -> bytes:
    """Two or three valid messages back to back, then a few byte-level edits."""
    data = bytearray(b"".join(draw(st.lists(st.sampled_from(corpus), min_size=1, max_size=3))))
    for _ in range(draw(st.integers(0, 4))):
        pos = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["insert", "delete", "replace", "truncate", "duplicate"]))
        if op == "insert":
            data[pos:pos] = draw(st.sampled_from(INTERESTING) | st.binary(min_size=1, max_size=4))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 4))]
        elif op == "replace" and pos < len(data):
            data[pos] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[pos:]
        elif op == "duplicate":
            data[pos:pos] = data[max(0, pos - 16):pos]
    return bytes(data)


def cut(data: bytes, points: list[int]) -> list[bytes]:
    edges = sorted({0, len(data), *(p % (len(data) + 1) for p in points)})
    return [data[a:b] for a, b in zip(edges, edges[1:], strict=False)]


def run(parser: RequestParser | ResponseParser, pieces: list[bytes], eof: bool) -> list[Event]:
    """Feed pieces; after a ProtocolError every further call must answer the same error."""
    events: list[Event] = []
    for piece in pieces:
        out = parser.feed(piece)
        if events and isinstance(events[-1], ProtocolError):
            assert out == [events[-1]], out
            continue
        events += out
    if eof:
        out = parser.feed_eof()
        if not (events and isinstance(events[-1], ProtocolError)):
            events += out
    return events


def check_grammar(events: list[Event], head_type: type) -> list[Event]:
    """(Head Body* EndOfMessage)* [Upgraded*] [ProtocolError]; returns events with Body and
    Upgraded pieces joined, the form in which cuts must not matter."""
    joined: list[Event] = []
    in_message = tunnel = False
    for i, ev in enumerate(events):
        assert isinstance(ev, head_type | Body | EndOfMessage | Upgraded | ProtocolError), ev
        if isinstance(ev, ProtocolError):
            assert i == len(events) - 1 and 400 <= ev.status <= 599 and ev.reason
        elif tunnel:
            assert isinstance(ev, Upgraded), events
        elif isinstance(ev, head_type):
            assert not in_message, events
            in_message = True
        elif isinstance(ev, Body):
            assert in_message, events
        elif isinstance(ev, EndOfMessage):
            assert in_message, events
            in_message = False
            last_head = next(e for e in reversed(joined) if isinstance(e, head_type))
            tunnel = last_head.upgrade  # type: ignore[attr-defined]
        else:
            raise AssertionError(f"Upgraded outside a tunnel: {events}")
        if isinstance(ev, Body | Upgraded) and joined and type(joined[-1]) is type(ev):
            joined[-1] = type(ev)(joined[-1].data + ev.data)  # type: ignore[union-attr]
        elif not (isinstance(ev, Upgraded) and not ev.data and joined and isinstance(joined[-1], Upgraded)):
            joined.append(ev)
    return joined


def assert_same_whatever_the_cuts(make: Callable[[], RequestParser | ResponseParser], data: bytes,
                                  points: list[int], eof: bool, head_type: type) -> None:
    whole = check_grammar(run(make(), [data], eof), head_type)
    pieces = check_grammar(run(make(), cut(data, points), eof), head_type)
    assert pieces == whole


@SETTINGS
@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=6), st.booleans())
def test_random_bytes_give_events_or_a_protocol_error(data: bytes, points: list[int], eof: bool) -> None:
    assert_same_whatever_the_cuts(RequestParser, data, points, eof, RequestHead)


@SETTINGS
@given(mutated(REQUESTS), st.lists(st.integers(0, 1000), max_size=6), st.booleans())
def test_mutated_requests_give_events_or_a_protocol_error(data: bytes, points: list[int], eof: bool) -> None:
    assert_same_whatever_the_cuts(RequestParser, data, points, eof, RequestHead)


@SETTINGS
@given(st.lists(st.sampled_from(REQUESTS), min_size=1, max_size=4),
       st.lists(st.integers(0, 1000), max_size=8))
def test_valid_requests_cut_anywhere_parse_without_error(messages: list[bytes], points: list[int]) -> None:
    data = b"".join(messages)
    events = check_grammar(run(RequestParser(), cut(data, points), False), RequestHead)
    assert not any(isinstance(ev, ProtocolError) for ev in events)
    heads = [ev for ev in events if isinstance(ev, RequestHead)]
    # Every message up to the first that ends the connection (upgrade, CONNECT, close).
    expected = 0
    for message in messages:
        expected += 1
        if b"Upgrade: websocket" in message or message.startswith(b"CONNECT") or b"close" in message:
            break
    assert len(heads) == expected


def response_parser(methods: list[bytes]) -> Callable[[], ResponseParser]:
    def make() -> ResponseParser:
        parser = ResponseParser()
        for method in methods:
            parser.expect(method, upgrade=True)
        return parser
    return make


@SETTINGS
@given(st.lists(st.sampled_from(RESPONSES), min_size=1, max_size=3), st.data(),
       st.lists(st.integers(0, 1000), max_size=6), st.booleans())
def test_mutated_responses_give_events_or_a_protocol_error(
        exchange: list[tuple[bytes, bytes]], data: st.DataObject, points: list[int], eof: bool) -> None:
    methods = [m for m, _ in exchange]
    wire = data.draw(mutated([r for _, r in exchange]))
    assert_same_whatever_the_cuts(response_parser(methods), wire, points, eof, ResponseHead)


@SETTINGS
@given(st.lists(st.sampled_from(RESPONSES), min_size=1, max_size=4),
       st.lists(st.integers(0, 1000), max_size=8))
def test_valid_responses_cut_anywhere_parse_without_error(exchange: list[tuple[bytes, bytes]],
                                                          points: list[int]) -> None:
    methods = [m for m, _ in exchange]
    data = b"".join(r for _, r in exchange)
    events = check_grammar(run(response_parser(methods)(), cut(data, points), True), ResponseHead)
    assert not any(isinstance(ev, ProtocolError) for ev in events[:-1])
    finals = [ev for ev in events if isinstance(ev, ResponseHead) and not ev.informational]
    ends_connection = [i for i, (_, r) in enumerate(exchange) if b" 101 " in r or b"established" in r
                       or b"HTTP/1.0" in r]
    answered = ends_connection[0] + 1 if ends_connection else len(exchange)
    assert len(finals) == answered
