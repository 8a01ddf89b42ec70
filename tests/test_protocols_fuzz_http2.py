"""Property-based fuzz of the HTTP/2 codec: random bytes, random frames and mutated or
truncated valid connections fed to an endpoint yield only the codec's own events, a protocol
violation ends the connection with a GOAWAY queued, and no other exception ever escapes.
Bounded to a few seconds; unit, no sockets. NODEMESH_FUZZ_EXAMPLES=5000 runs a longer search."""

from __future__ import annotations

import os
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataplane.protocols.http2 import (
    Data,
    GoAway,
    H2Endpoint,
    ProtocolViolation,
    RequestHeaders,
    ResponseHeaders,
    StreamReset,
    Trailers,
    WindowOpened,
)

OUR_EVENTS = (RequestHeaders, ResponseHeaders, Data, Trailers, StreamReset, GoAway, WindowOpened,
              ProtocolViolation)
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FUZZ = settings(max_examples=int(os.environ.get("NODEMESH_FUZZ_EXAMPLES", "300")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
GOAWAY_TYPE = 0x7
STREAM_IDS = [0, 1, 2, 3, 5, 2**31 - 1]


def frame(ftype: int, flags: int, stream_id: int, payload: bytes, length: int | None = None) -> bytes:
    size = len(payload) if length is None else length
    return struct.pack(">I", size)[1:] + bytes([ftype, flags]) + struct.pack(">I", stream_id) + payload


def valid_client_stream() -> bytes:
    """A well-formed client connection: requests with bodies and trailers, a reset, pings,
    settings, window updates and a GOAWAY, as a real client endpoint writes them."""
    client = H2Endpoint(True, stream_window=20000)
    out = client.initiate()
    for i in range(4):
        sid = client.new_stream_id()
        client.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":authority", "a.b"),
                                  (":path", f"/svc/M{i}"), ("content-type", "application/grpc"),
                                  ("te", "trailers"), ("x-n", str(i) * i)])
        client.send_data(sid, bytes([i]) * (100 * i + 5))
        if i == 2:
            client.reset(sid)
        elif i == 3:
            client.send_trailers(sid, [("x-checksum", "abc")])
        else:
            client.send_data(sid, b"", end_stream=True)
    client._conn.ping(b"12345678")  # no public ping: the codec leaves keepalive to its driver
    client._conn.update_settings({0x4: 30000})
    client._conn.increment_flow_control_window(1000)
    client.close()
    return out + client.data_to_send()


VALID = valid_client_stream()


def drive(endpoint: H2Endpoint, chunks: list[bytes]) -> None:
    """Feed the chunks as a proxy would, answering requests, and check every outcome."""
    for chunk in chunks:
        events = endpoint.receive(chunk)
        for event in events:
            assert isinstance(event, OUR_EVENTS), event
            if isinstance(event, RequestHeaders) and not endpoint.closed:
                endpoint.send_headers(event.stream_id, [(":status", "200")])
                endpoint.send_data(event.stream_id, b"ok", end_stream=True)
            elif isinstance(event, Data):
                endpoint.acknowledge(event.stream_id, event.flow_controlled_length)
        violations = [e for e in events if isinstance(e, ProtocolViolation)]
        if violations:
            assert events[-1] is violations[0] and len(violations) == 1
            assert endpoint.closed
            assert last_frame_type(endpoint.data_to_send()) == GOAWAY_TYPE
            assert endpoint.receive(chunk) == []
            return
        endpoint.data_to_send()


def last_frame_type(data: bytes) -> int | None:
    pos, ftype = 0, None
    while pos + 9 <= len(data):
        ftype = data[pos + 3]
        pos += 9 + int.from_bytes(data[pos:pos + 3], "big")
    assert pos == len(data), "whole frames only"
    return ftype


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False) if b > a] or [b""]


@FUZZ
@given(st.binary(max_size=512), st.booleans())
def test_random_bytes_only_yield_codec_events(data: bytes, with_preface: bool) -> None:
    server = H2Endpoint(False)
    server.initiate()
    drive(server, [PREFACE + data if with_preface else data])


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 12), st.integers(0, 255), st.sampled_from(STREAM_IDS),
                          st.binary(max_size=40), st.one_of(st.none(), st.integers(0, 70000))),
                max_size=12),
       st.lists(st.integers(0, 10_000), max_size=4))
def test_random_frames_only_yield_codec_events(frames: list[tuple[int, int, int, bytes, int | None]],
                                               cuts: list[int]) -> None:
    server = H2Endpoint(False)
    server.initiate()
    wire = PREFACE + frame(0x4, 0, 0, b"") + b"".join(frame(*f) for f in frames)
    drive(server, split(wire, cuts))


@FUZZ
@given(st.integers(0, len(VALID)), st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)),
                                            max_size=6),
       st.lists(st.integers(0, 10_000), max_size=6))
def test_truncated_and_mutated_connections_only_yield_codec_events(
        keep: int, flips: list[tuple[int, int]], cuts: list[int]) -> None:
    data = bytearray(VALID)
    for at, value in flips:
        data[at] = value
    server = H2Endpoint(False)
    server.initiate()
    drive(server, split(bytes(data[:keep]), cuts))


@FUZZ
@given(st.binary(max_size=300), st.lists(st.integers(0, 10_000), max_size=4))
def test_client_side_survives_a_garbage_server(data: bytes, cuts: list[int]) -> None:
    client = H2Endpoint(True)
    client.initiate()
    sid = client.new_stream_id()
    client.send_headers(sid, [(":method", "GET"), (":scheme", "http"), (":authority", "a"), (":path", "/")],
                        end_stream=True)
    drive(client, split(frame(0x4, 0, 0, b"") + data, cuts))


def test_the_valid_connection_is_accepted_whole() -> None:
    """The seed of the mutations is itself clean, so the fuzz starts from a real conversation."""
    server = H2Endpoint(False)
    server.initiate()
    events = server.receive(VALID)
    assert not any(isinstance(e, ProtocolViolation) for e in events)
    assert sum(isinstance(e, RequestHeaders) for e in events) == 4
    assert isinstance(events[-1], GoAway)


def test_feeding_one_byte_at_a_time_gives_the_same_events() -> None:
    """Frame boundaries never line up with reads on a real socket (the GOAWAY at the end included)."""
    whole, trickle = H2Endpoint(False), H2Endpoint(False)
    whole.initiate()
    trickle.initiate()
    expected = whole.receive(VALID)
    got = [event for i in range(len(VALID)) for event in trickle.receive(VALID[i:i + 1])]
    assert got == expected
