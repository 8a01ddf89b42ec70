"""The HTTP/1.1 codec, with plain bytes: framing, pipelining, upgrades, smuggling shapes,
limits, and serializers whose output parses back to the same message."""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from dataplane.protocols.http1 import (
    MAX_HEAD,
    Body,
    EndOfMessage,
    Event,
    ProtocolError,
    RequestHead,
    RequestParser,
    ResponseHead,
    ResponseParser,
    Upgraded,
    framing_for_peer,
    serialize_chunk,
    serialize_last_chunk,
    serialize_request_head,
    serialize_response_head,
    simple_response,
)

GET = b"GET /a?b=1 HTTP/1.1\r\nHost: svc\r\nUser-Agent: t\r\n\r\n"
POST = b"POST /upload HTTP/1.1\r\nHost: svc\r\nContent-Length: 11\r\n\r\nhello world"
CHUNKED = (b"POST /c HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\nTrailer: x-sum\r\n\r\n"
           b"5;name=value\r\nhello\r\n6;a=\"quoted;ext\";b\r\n world\r\n"
           b"0;last\r\nX-Sum: 42\r\nX-Other:  y \r\n\r\n")
HEAD_REQ = b"HEAD / HTTP/1.1\r\nHost: svc\r\n\r\n"
PIPELINE = GET + POST + CHUNKED + HEAD_REQ


def merged(events: Iterable[Event]) -> list[Event]:
    """Events with adjacent Body (or Upgraded) pieces joined: how bytes were split must
    not matter."""
    out: list[Event] = []
    for ev in events:
        if isinstance(ev, Body | Upgraded) and out and type(out[-1]) is type(ev):
            out[-1] = type(ev)(out[-1].data + ev.data)  # type: ignore[union-attr]
        else:
            out.append(ev)
    return out


def feed_requests(pieces: Iterable[bytes], eof: bool = False) -> list[Event]:
    parser = RequestParser()
    events = [ev for piece in pieces for ev in parser.feed(piece)]
    if eof:
        events += parser.feed_eof()
    return merged(events)


def feed_responses(methods: Iterable[bytes], pieces: Iterable[bytes], eof: bool = False,
                   upgrade: bool = False) -> list[Event]:
    parser = ResponseParser()
    for method in methods:
        parser.expect(method, upgrade=upgrade)
    events = [ev for piece in pieces for ev in parser.feed(piece)]
    if eof:
        events += parser.feed_eof()
    return merged(events)


def splits(data: bytes) -> Iterable[list[bytes]]:
    """Every way of cutting ``data`` in two, plus one byte at a time."""
    for i in range(len(data) + 1):
        yield [data[:i], data[i:]]
    yield [data[i:i + 1] for i in range(len(data))]


def only_error(events: list[Event]) -> ProtocolError:
    errors = [ev for ev in events if isinstance(ev, ProtocolError)]
    assert errors and events[-1] is errors[0], events
    return errors[0]


# --- requests ------------------------------------------------------------------------------

def test_pipelined_requests_come_out_in_order() -> None:
    events = feed_requests([PIPELINE])
    heads = [ev for ev in events if isinstance(ev, RequestHead)]
    assert [(h.method, h.target) for h in heads] == [
        (b"GET", b"/a?b=1"), (b"POST", b"/upload"), (b"POST", b"/c"), (b"HEAD", b"/")]
    assert [type(ev).__name__ for ev in events] == [
        "RequestHead", "EndOfMessage", "RequestHead", "Body", "EndOfMessage",
        "RequestHead", "Body", "EndOfMessage", "RequestHead", "EndOfMessage"]
    assert all(h.keep_alive for h in heads)


def test_requests_split_at_every_byte_boundary_give_the_same_events() -> None:
    whole = feed_requests([PIPELINE])
    for pieces in splits(PIPELINE):
        assert feed_requests(pieces) == whole


def test_head_fields_are_lowercased_and_values_trimmed() -> None:
    head = feed_requests([b"GET / HTTP/1.1\r\nHOST: svc\r\nX-Pad:   v  \t\r\n\r\n"])[0]
    assert isinstance(head, RequestHead)
    assert head.headers == ((b"host", b"svc"), (b"x-pad", b"v"))
    assert head.get(b"x-pad") == b"v" and head.get(b"missing") is None
    assert head.version == "1.1" and head.framing == "none" and head.content_length is None


def test_content_length_body_is_reported_with_its_framing() -> None:
    head, body, end = feed_requests([POST])
    assert isinstance(head, RequestHead)
    assert (head.framing, head.content_length, head.chunked) == ("length", 11, False)
    assert body == Body(b"hello world") and end == EndOfMessage()


def test_chunked_body_drops_extensions_and_keeps_trailers() -> None:
    head, body, end = feed_requests([CHUNKED])
    assert isinstance(head, RequestHead) and head.chunked
    assert body == Body(b"hello world")
    assert end == EndOfMessage(trailers=((b"x-sum", b"42"), (b"x-other", b"y")))


def test_body_streams_as_it_arrives() -> None:
    parser = RequestParser()
    size = 1 << 20
    events = parser.feed(b"PUT /big HTTP/1.1\r\nHost: svc\r\nContent-Length: %d\r\n\r\n" % size)
    assert [type(ev) for ev in events] == [RequestHead]
    piece = b"x" * 65536
    for _ in range(size // len(piece) - 1):
        assert parser.feed(piece) == [Body(piece)]  # out at once, not held until the end
    assert parser.feed(piece) == [Body(piece), EndOfMessage()]


def test_keep_alive_follows_version_and_connection_header() -> None:
    def keep_alive(request: bytes) -> bool:
        head = feed_requests([request])[0]
        assert isinstance(head, RequestHead)
        return head.keep_alive
    assert keep_alive(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert not keep_alive(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert not keep_alive(b"GET / HTTP/1.0\r\n\r\n")
    assert keep_alive(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")


def test_bytes_after_a_connection_close_request_are_ignored() -> None:
    parser = RequestParser()
    events = parser.feed(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n" + GET)
    assert [type(ev) for ev in events] == [RequestHead, EndOfMessage]
    assert parser.phase == "closed"
    assert parser.feed(GET) == []


def test_websocket_upgrade_turns_the_rest_into_tunnel_bytes() -> None:
    request = (b"GET /chat HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
               b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    parser = RequestParser()
    head, end, tunnel = parser.feed(request + b"\x81\x05hello GET / HTTP/1.1\r\n")
    assert isinstance(head, RequestHead) and head.upgrade and head.upgrade_to == b"websocket"
    assert end == EndOfMessage()
    assert tunnel == Upgraded(b"\x81\x05hello GET / HTTP/1.1\r\n")  # never parsed as a request
    assert parser.feed(b"more") == [Upgraded(b"more")]
    assert parser.phase == "tunnel"
    for pieces in splits(request + b"\x81\x05hello"):
        assert feed_requests(pieces) == [head, end, Upgraded(b"\x81\x05hello")]


def test_connect_turns_the_rest_into_tunnel_bytes() -> None:
    events = feed_requests([b"CONNECT db.svc:5432 HTTP/1.1\r\nHost: db.svc:5432\r\n\r\n\x16\x03\x01"])
    head, end, tunnel = events
    assert isinstance(head, RequestHead) and head.upgrade and head.target == b"db.svc:5432"
    assert head.upgrade_to is None
    assert tunnel == Upgraded(b"\x16\x03\x01")


def test_h2c_upgrade_is_not_honoured_and_requests_go_on() -> None:
    h2c = (b"POST /x HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
           b"HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\nContent-Length: 3\r\n\r\nabc")
    for pieces in splits(h2c + GET):
        events = feed_requests(pieces)
        assert [type(ev) for ev in events] == [RequestHead, Body, EndOfMessage, RequestHead, EndOfMessage]
        assert not events[0].upgrade and events[1] == Body(b"abc")  # type: ignore[union-attr]


def test_h2c_upgrade_with_a_chunked_body_is_still_decoded() -> None:
    h2c = (b"POST /x HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nT: 1\r\n\r\n")
    events = feed_requests([h2c + GET])
    assert events[1:3] == [Body(b"abc"), EndOfMessage(((b"t", b"1"),))]
    assert isinstance(events[3], RequestHead) and events[3].target == b"/a?b=1"


POST_A = b"POST / HTTP/1.1\r\nHost: a\r\n"
CHUNKED_A = POST_A + b"Transfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(("request_bytes", "status"), [
    # request smuggling: two framings, or two lengths
    (POST_A + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    (POST_A + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n", 400),
    (POST_A + b"Content-Length: 4\r\nContent-Length: 5\r\n\r\nabcde", 400),
    (POST_A + b"Content-Length: 4\r\nContent-Length: 4\r\n\r\nabcd", 400),
    (POST_A + b"Content-Length: 4, 4\r\n\r\nabcd", 400),
    (POST_A + b"Content-Length: +4\r\n\r\nabcd", 400),
    (POST_A + b"Content-Length: 99999999999999999999999\r\n\r\n", 400),
    (POST_A + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n", 400),
    (POST_A + b"Transfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n", 400),
    (POST_A + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    (POST_A + b"Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n", 400),
    (POST_A + b"Transfer-Encoding: gzip\r\n\r\nabc", 501),
    (POST_A + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
    # invalid chunk sizes
    (CHUNKED_A + b"zz\r\nhello\r\n0\r\n\r\n", 400),
    (CHUNKED_A + b"-5\r\nhello\r\n0\r\n\r\n", 400),
    (CHUNKED_A + b"0x5\r\nhello\r\n0\r\n\r\n", 400),
    (CHUNKED_A + b"5 \r\nhello\r\n0\r\n\r\n", 400),
    (CHUNKED_A + b"fffffffffffffffff1\r\nx\r\n0\r\n\r\n", 400),
    (CHUNKED_A + b"5\r\nhelloXX0\r\n\r\n", 400),
    # line endings, folding, bad bytes
    (b"GET / HTTP/1.1\nHost: a\n\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\n folded\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\x00b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHo st: a\r\n\r\n", 400),
    (b"get / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"GET /\xff HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    # what the proxy needs to route, and versions it does not speak
    (b"GET / HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    (b"GET / HTTP/0.9\r\nHost: a\r\n\r\n", 505),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    # a body on an upgrade would be told from the tunnel only by the upstream's answer
    (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
     b"Content-Length: 3\r\n\r\nabc", 400),
    (b"CONNECT a:1 HTTP/1.1\r\nHost: a:1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
])
def test_malformed_and_smuggling_shapes_are_protocol_errors(request_bytes: bytes, status: int) -> None:
    for pieces in ([request_bytes], [request_bytes[i:i + 1] for i in range(len(request_bytes))]):
        error = only_error(feed_requests(pieces))
        assert error.status == status, error
        # Body pieces may stream before the error is seen, but the request never completes.
        assert not any(isinstance(ev, EndOfMessage) for ev in feed_requests(pieces))


def test_after_an_error_the_parser_refuses_input() -> None:
    parser = RequestParser()
    events = parser.feed(GET + b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n")
    assert [type(ev) for ev in events] == [RequestHead, EndOfMessage, ProtocolError]
    assert parser.phase == "error" and parser.error == events[-1]
    assert parser.feed(GET) == [events[-1]]
    assert parser.feed_eof() == [events[-1]]


def test_a_large_head_is_accepted_and_an_oversized_one_is_431() -> None:
    big = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-Pad: %s\r\n" % (b"p" * 200) * (MAX_HEAD // 220) + b"\r\n"
    assert len(big) <= MAX_HEAD
    assert [type(ev) for ev in feed_requests([big])] == [RequestHead, EndOfMessage]
    huge = b"GET / HTTP/1.1\r\nHost: a\r\nX-Huge: " + b"h" * (2 * MAX_HEAD)
    parser = RequestParser()
    events = [ev for i in range(0, len(huge), 1000) for ev in parser.feed(huge[i:i + 1000])]
    assert only_error(events).status == 431


def test_an_endless_chunk_extension_is_refused() -> None:
    parser = RequestParser()
    parser.feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;x=")
    events = [ev for _ in range(10) for ev in parser.feed(b"e" * 32768)]
    assert only_error(events).status == 400


def test_client_eof_in_the_middle_of_a_request_is_an_error() -> None:
    assert only_error(feed_requests([POST[:-3]], eof=True)).status == 400
    assert only_error(feed_requests([GET[:10]], eof=True)).status == 400
    assert feed_requests([GET], eof=True)[-1] == EndOfMessage()


# --- responses -----------------------------------------------------------------------------

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello"
OK_CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x\r\nabc\r\n0\r\nGrpc-Status: 0\r\n\r\n"
HEAD_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"
NO_CONTENT = b"HTTP/1.1 204 No Content\r\n\r\n"


def test_pipelined_responses_follow_the_methods_in_order_at_every_split() -> None:
    methods = [b"GET", b"GET", b"HEAD", b"GET", b"HEAD", b"GET"]
    stream = OK + OK_CHUNKED + HEAD_OK + NO_CONTENT + HEAD_OK + OK
    whole = feed_responses(methods, [stream])
    heads = [ev for ev in whole if isinstance(ev, ResponseHead)]
    assert [(h.status, h.framing, h.content_length) for h in heads] == [
        (200, "length", 5), (200, "chunked", None), (200, "none", 1234),
        (204, "none", None), (200, "none", 1234), (200, "length", 5)]
    assert [ev for ev in whole if isinstance(ev, Body)] == [Body(b"hello"), Body(b"abc"), Body(b"hello")]
    assert whole[5] == EndOfMessage(((b"grpc-status", b"0"),))
    for pieces in splits(stream):
        assert feed_responses(methods, pieces) == whole


def test_a_head_announced_while_a_response_is_half_read_is_still_cut_right() -> None:
    # The pool writes the next request (and announces it) while a response is arriving.
    stream = OK + HEAD_OK + OK
    whole = feed_responses([b"GET", b"HEAD", b"GET"], [stream])
    for i in range(len(OK) + 1):
        parser = ResponseParser()
        parser.expect(b"GET")
        events = parser.feed(stream[:i])
        parser.expect(b"HEAD")
        parser.expect(b"GET")
        assert merged(events + parser.feed(stream[i:])) == whole


def test_head_response_has_no_body_even_with_a_length_or_chunked() -> None:
    head_chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    events = feed_responses([b"HEAD", b"GET"], [head_chunked + OK])
    assert [type(ev) for ev in events] == [ResponseHead, EndOfMessage, ResponseHead, Body, EndOfMessage]


@pytest.mark.parametrize("status", [204, 304])
def test_204_and_304_have_no_body_whatever_the_headers(status: int) -> None:
    response = b"HTTP/1.1 %d X\r\nContent-Length: 42\r\n\r\n" % status
    head, end, *rest = feed_responses([b"GET", b"GET"], [response + OK])
    assert isinstance(head, ResponseHead) and head.framing == "none" and head.content_length == 42
    assert end == EndOfMessage() and rest[1] == Body(b"hello")


def test_informational_responses_precede_the_final_one() -> None:
    stream = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK
    parser = ResponseParser()
    parser.expect(b"POST")
    events = parser.feed(stream)
    heads = [ev for ev in events if isinstance(ev, ResponseHead)]
    assert [(h.status, h.informational) for h in heads] == [(100, True), (103, True), (200, False)]
    assert parser.idle


def test_response_without_length_ends_at_eof() -> None:
    parser = ResponseParser()
    parser.expect(b"GET")
    head, body = parser.feed(b"HTTP/1.1 200 OK\r\n\r\nsome")
    assert isinstance(head, ResponseHead) and head.framing == "eof" and not head.keep_alive
    assert parser.feed(b" more") == [Body(b" more")]
    assert parser.feed_eof() == [EndOfMessage()]
    assert parser.phase == "closed"


def test_switching_protocols_opens_the_tunnel() -> None:
    response = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    for pieces in splits(response + b"\x81\x02hi"):
        events = feed_responses([b"GET"], pieces, upgrade=True)
        assert [type(ev) for ev in events] == [ResponseHead, EndOfMessage, Upgraded]
        assert events[-1] == Upgraded(b"\x81\x02hi") and events[0].upgrade  # type: ignore[union-attr]


def test_a_101_nobody_asked_for_is_an_error() -> None:
    response = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"
    assert only_error(feed_responses([b"GET"], [response])).status == 502


def test_connect_2xx_opens_the_tunnel_and_a_refusal_has_a_body() -> None:
    for pieces in splits(b"HTTP/1.1 200 Connection established\r\n\r\n\x16\x03\x03"):
        events = feed_responses([b"CONNECT"], pieces)
        assert [type(ev) for ev in events] == [ResponseHead, EndOfMessage, Upgraded]
        assert events[-1] == Upgraded(b"\x16\x03\x03")
    refused = feed_responses([b"CONNECT"], [b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno"])
    assert [type(ev) for ev in refused] == [ResponseHead, Body, EndOfMessage]


def test_a_response_to_no_request_is_an_error() -> None:
    assert only_error(feed_responses([], [OK])).status == 502
    assert only_error(feed_responses([b"GET"], [OK + OK])).status == 502


def test_upstream_eof_before_or_during_a_response_is_an_error() -> None:
    assert only_error(feed_responses([b"GET"], [], eof=True)).reason.endswith("before responding")
    assert only_error(feed_responses([b"GET"], [OK[:-2]], eof=True)).status == 502
    assert feed_responses([b"GET"], [OK], eof=True)[-1] == EndOfMessage()


@pytest.mark.parametrize("response", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nxyz\r\n",
    b"HTTP/1.1 2000 OK\r\n\r\n",
    b"HTTP/2.0 200 OK\r\n\r\n",
    b"SSH-2.0-OpenSSH\r\n",
])
def test_malformed_responses_are_502(response: bytes) -> None:
    assert only_error(feed_responses([b"GET"], [response])).status == 502


def test_response_parser_refuses_requests_on_a_closed_connection() -> None:
    parser = ResponseParser()
    parser.expect(b"GET")
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    assert parser.phase == "closed" and not parser.idle
    with pytest.raises(RuntimeError, match="closed"):
        parser.expect(b"GET")


# --- serializers ---------------------------------------------------------------------------

def test_hop_by_hop_and_nominated_headers_are_not_forwarded() -> None:
    head = serialize_request_head(b"GET", b"/", [
        (b"Host", b"svc"), (b"Connection", b"keep-alive, X-Hop, Host"), (b"Keep-Alive", b"timeout=5"),
        (b"Proxy-Connection", b"keep-alive"), (b"TE", b"trailers"), (b"Trailer", b"x"),
        (b"Upgrade", b"websocket"), (b"X-Hop", b"1"), (b"X-End", b"2")])
    assert head == b"GET / HTTP/1.1\r\nhost: svc\r\nx-end: 2\r\n\r\n"


def test_framing_is_written_from_one_decision() -> None:
    headers = [(b"Host", b"svc"), (b"Content-Length", b"999"), (b"Transfer-Encoding", b"chunked")]
    assert serialize_request_head(b"POST", b"/", headers, framing="length", content_length=3) == \
        b"POST / HTTP/1.1\r\nhost: svc\r\ncontent-length: 3\r\n\r\n"
    assert serialize_request_head(b"POST", b"/", headers, framing="chunked") == \
        b"POST / HTTP/1.1\r\nhost: svc\r\ntransfer-encoding: chunked\r\n\r\n"
    assert serialize_request_head(b"GET", b"/", headers) == b"GET / HTTP/1.1\r\nhost: svc\r\n\r\n"
    with pytest.raises(ValueError):
        serialize_request_head(b"POST", b"/", headers, framing="eof")


def test_response_framing_rules() -> None:
    assert serialize_response_head(200, b"OK", [], framing="eof") == \
        b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n"
    assert serialize_response_head(200, b"OK", [(b"Content-Length", b"7")], content_length=7) == \
        b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n"  # a HEAD response keeps its length
    assert serialize_response_head(204, b"No Content", [(b"Content-Length", b"7")], content_length=7) == \
        b"HTTP/1.1 204 No Content\r\n\r\n"
    to_http10 = serialize_response_head(200, b"OK", [], framing="length", content_length=0,
                                        peer_version="1.0")
    assert to_http10 == b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: keep-alive\r\n\r\n"
    assert serialize_response_head(101, b"Switching Protocols", [], upgrade=b"websocket") == \
        b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"
    with pytest.raises(ValueError, match="framing_for_peer"):
        serialize_response_head(200, b"OK", [], framing="chunked", peer_version="1.0")
    assert framing_for_peer("chunked", "1.0") == "eof"
    assert framing_for_peer("chunked", "1.1") == "chunked"


@pytest.mark.parametrize(("name", "value"), [(b"X-A", b"v\r\nInjected: 1"), (b"X-A\r\n", b"v"),
                                             (b"X A", b"v"), (b"X-A", b"v\x00")])
def test_header_injection_is_refused(name: bytes, value: bytes) -> None:
    with pytest.raises(ValueError):
        serialize_response_head(200, b"OK", [(name, value)])


def test_chunks_and_trailers() -> None:
    assert serialize_chunk(b"hello") == b"5\r\nhello\r\n"
    assert serialize_chunk(b"") == b""
    assert serialize_last_chunk() == b"0\r\n\r\n"
    assert serialize_last_chunk([(b"Grpc-Status", b"0"), (b"Connection", b"x")]) == \
        b"0\r\ngrpc-status: 0\r\n\r\n"


def test_serialized_messages_parse_back_to_the_same_message() -> None:
    head, body, end = feed_requests([CHUNKED])
    assert isinstance(head, RequestHead) and isinstance(body, Body) and isinstance(end, EndOfMessage)
    wire = (serialize_request_head(head.method, head.target, head.headers, framing=head.framing)
            + serialize_chunk(body.data[:3]) + serialize_chunk(body.data[3:])
            + serialize_last_chunk(end.trailers))
    again = feed_requests([wire])
    assert again[1:] == [body, end]
    assert isinstance(again[0], RequestHead) and again[0].method == head.method
    assert again[0].headers == ((b"host", b"svc"), (b"transfer-encoding", b"chunked"))


@pytest.mark.parametrize("status", [400, 404, 429, 503, 504])
def test_simple_responses_are_complete_and_parseable(status: int) -> None:
    wire = simple_response(status, body=b"upstream said no", close=True)
    head, body, end = feed_responses([b"GET"], [wire])
    assert isinstance(head, ResponseHead) and head.status == status and not head.keep_alive
    assert head.content_length == len(b"upstream said no") and body == Body(b"upstream said no")
    assert head.get(b"content-type") == b"text/plain; charset=utf-8"
    assert simple_response(404, "Not Here").startswith(b"HTTP/1.1 404 Not Here\r\ncontent-length: 0\r\n")
