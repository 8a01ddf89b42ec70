"""Protocol detection: declared protocols (Istio's naming rules) and the first-bytes sniff."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.registry import ServicePort
from controlplane.translate import protocol_of
from dataplane.protocols.detect import H2_PREFACE, MAX_REQUEST_LINE, Sniffer, classify, declared

CLIENT_HELLO = bytes.fromhex("160301020001") + b"\x00" * 64
REQUEST = b"GET /api/v1/items?id=7 HTTP/1.1\r\nHost: a\r\n\r\n"


@pytest.mark.parametrize(("app_protocol", "name", "want"), [
    (None, "http", "http1"),
    (None, "http-web", "http1"),
    (None, "HTTP-Web", "http1"),
    (None, "http2", "http2"),
    (None, "h2c-api", "http2"),
    (None, "grpc", "grpc"),
    (None, "grpc-web", "grpc"),
    (None, "grpc-web-ui", "grpc"),
    (None, "tcp-db", "tcp"),
    (None, "mysql", "tcp"),
    (None, "redis-cache", "tcp"),
    (None, "mongo", "tcp"),
    (None, "tls-passthrough", "tls"),
    (None, "https", "tls"),
    (None, "web", None),
    (None, "", None),
    ("http", "tcp-x", "http1"),
    ("grpc", "http", "grpc"),
    ("HTTP2", "web", "http2"),
    ("kubernetes.io/h2c", "web", "http2"),
    ("kubernetes.io/ws", "web", "http1"),
    ("kubernetes.io/wss", "web", "tls"),
    ("custom.example/proto", "http", None),
])
def test_declared_protocol_follows_istio_naming(app_protocol: str | None, name: str,
                                                want: str | None) -> None:
    assert declared(app_protocol, name) == want


def test_app_protocol_wins_over_port_name() -> None:
    assert declared("tcp", "http-web") == "tcp"
    assert declared("http", "grpc") == "http1"


def test_undeclared_server_first_port_is_tcp_not_sniffed() -> None:
    assert declared(None, "smtp", port=25) == "tcp"
    assert declared(None, "db", port=3306) == "tcp"
    assert declared(None, "web", port=8080) is None
    assert declared(None, "http", port=3306) == "http1"  # a declaration still wins


@pytest.mark.parametrize("name", ["http", "http-web", "http2", "h2c", "grpc", "grpc-web", "tcp", "mysql",
                                  "redis", "mongo", "tls", "https"])
def test_declared_agrees_with_xds_translation(name: str) -> None:
    # translate.protocol_of says what the xDS side builds; both must tell HTTP from TCP alike.
    # declared() keeps "tls" apart from "tcp"; protocol_of treats both as opaque TCP.
    xds = protocol_of(ServicePort(name=name, port=80, target_port=80))
    mine = declared(None, name)
    assert {"http1": "http", "tls": "tcp"}.get(mine or "", mine) == xds


def test_http2_preface_is_detected_and_its_prefixes_wait() -> None:
    assert classify(H2_PREFACE) == "http2"
    assert classify(H2_PREFACE + b"\x00\x00\x12\x04") == "http2"
    for i in range(1, len(H2_PREFACE)):
        assert classify(H2_PREFACE[:i]) is None, H2_PREFACE[:i]


def test_http1_request_line_is_detected_and_its_prefixes_wait() -> None:
    line_end = REQUEST.index(b"\r\n") + 2
    assert classify(REQUEST[:line_end]) == "http1"
    assert classify(REQUEST) == "http1"
    for i in range(1, line_end):
        assert classify(REQUEST[:i]) is None, REQUEST[:i]


@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH",
                                    b"CONNECT", b"PROPFIND", b"M-SEARCH"])
def test_known_methods_are_http1(method: bytes) -> None:
    assert classify(method + b" * HTTP/1.0\r\n") == "http1"


@pytest.mark.parametrize("data", [
    b"get / HTTP/1.1\r\n",  # methods are case-sensitive
    b"FOO / HTTP/1.1\r\n",
    b"GET key\r\n",  # Redis inline command, not HTTP
    b"GET /\r\n",  # HTTP/0.9
    b"GET  / HTTP/1.1\r\n",  # empty target
    b"GET / HTTP/2.0\r\n",
    b"GET / HTTP/1.1\n",  # bare LF
    b"GET /\xc3\xa9 HTTP/1.1\r\n",  # raw UTF-8 in the target: the codec would refuse it
    b"*1\r\n$4\r\nPING\r\n",  # Redis
    b"\x00\x00\x00\x2c\x00\x00\x00\x00",  # binary
    b"SSH-2.0-OpenSSH_9.6\r\n",
    b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n",  # a broken preface
])
def test_not_http_is_tcp(data: bytes) -> None:
    assert classify(data) == "tcp"


def test_tcp_is_decided_at_the_first_impossible_byte() -> None:
    assert classify(b"X") == "tcp"
    assert classify(b"GEX") == "tcp"
    assert classify(b"GET /a\r") == "tcp"
    assert classify(b"GET / HTTP/1.1\r") is None
    assert classify(b"GET / HTTP/1.1\rX") == "tcp"


def test_tls_client_hello_is_tls_and_other_records_are_tcp() -> None:
    assert classify(CLIENT_HELLO) == "tls"
    for i in range(1, 6):
        assert classify(CLIENT_HELLO[:i]) is None
    assert classify(b"\x16\x03\x05\x00\x10\x01") == "tcp"  # no TLS 3.5
    assert classify(b"\x16\x03\x01\x00\x00\x01") == "tcp"  # empty record
    assert classify(b"\x16\x03\x03\x00\x10\x02") == "tcp"  # ServerHello: a client never sends it
    assert classify(b"\x17\x03\x03\x00\x10") == "tcp"  # application data, not a handshake


def test_an_endless_request_line_is_decided_within_the_bound() -> None:
    long_target = b"GET /" + b"a" * (MAX_REQUEST_LINE + 100)
    assert classify(long_target[:MAX_REQUEST_LINE - 100]) is None
    assert classify(long_target) == "tcp"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64), st.binary(max_size=64))
def test_a_decision_never_changes_with_more_bytes(first: bytes, more: bytes) -> None:
    for data in (first, REQUEST[:len(first)] + first, H2_PREFACE[:len(first)] + first):
        decided = classify(data)
        if decided is not None:
            assert classify(data + more) == decided


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=1, max_size=32))
def test_enough_bytes_always_decide(tail: bytes) -> None:
    # Whatever the start, MAX_REQUEST_LINE + 12 bytes settle the question.
    for start in (b"", b"GET /", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r", b"\x16\x03\x01\x02"):
        data = (start + tail * (MAX_REQUEST_LINE // len(tail) + 1))[:MAX_REQUEST_LINE + 12]
        assert classify(data) is not None


def test_sniffer_waits_then_decides_and_keeps_the_bytes() -> None:
    sniffer = Sniffer()
    for i, byte in enumerate(REQUEST):
        decision = sniffer.feed(bytes([byte]))
        assert decision == (None if i < REQUEST.index(b"\r\n") + 1 else "http1")
        if decision:
            break
    assert sniffer.decision == "http1"
    assert sniffer.buffered == REQUEST[:len(sniffer.buffered)]
    assert sniffer.buffered.endswith(b"HTTP/1.1\r\n")


def test_server_first_protocol_is_tcp_when_the_window_expires() -> None:
    sniffer = Sniffer()
    assert sniffer.timeout() == "tcp"  # the client said nothing (SMTP, MySQL)
    assert sniffer.buffered == b""


def test_a_slow_partial_request_line_is_tcp_when_the_window_expires() -> None:
    sniffer = Sniffer()
    assert sniffer.feed(b"GET /slow") is None
    assert sniffer.timeout() == "tcp"
    assert sniffer.buffered == b"GET /slow"


def test_sniffer_refuses_bytes_after_deciding() -> None:
    sniffer = Sniffer()
    assert sniffer.feed(H2_PREFACE) == "http2"
    assert sniffer.timeout() == "http2"
    with pytest.raises(RuntimeError, match="already decided"):
        sniffer.feed(b"more")
