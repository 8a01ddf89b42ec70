"""HTTP/2 and gRPC codec for the node proxy: one sans-IO endpoint per h2c connection.

A thin layer over ``h2.connection.H2Connection`` shaped for a proxy that sits between a
downstream (server-side) and upstream (client-side) connections: bytes in, small frozen
events out, flow control left to the proxy so that it is honoured end to end, and headers
cleaned of what HTTP/2 forbids. No sockets, no asyncio, no clocks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.connection import ConnectionState
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

__all__ = [
    "CannotOpenStream", "Data", "ErrorCodes", "Event", "GoAway", "H2Endpoint", "Header", "Headers",
    "ProtocolViolation", "RequestHeaders", "ResponseHeaders", "StreamReset", "Trailers", "WindowOpened",
    "from_h2_headers", "grpc_status", "is_grpc", "to_h2_headers",
]

Header = tuple[bytes, bytes]
Headers = tuple[Header, ...]

DEFAULT_STREAM_WINDOW = 1 << 20
# A few stream windows, so that one stalled stream (a slow client behind a pooled upstream
# connection) holds at most a quarter of the connection window and its siblings keep flowing,
# while what the proxy may hold per connection stays bounded.
DEFAULT_CONNECTION_WINDOW = 4 << 20
# Headroom over the RFC's suggested 100: h2 fails the whole connection (not just the stream)
# when a client opens more, which a client may do before our SETTINGS reach it. Memory stays
# bounded by the connection window, whatever the stream count.
DEFAULT_MAX_CONCURRENT_STREAMS = 256
MAX_HEADER_LIST_SIZE = 64 * 1024

_PREFACE_LEN = 24  # b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", only on the server side
_RFC_DEFAULT_WINDOW = 65535
_FRAME_HEADER_LEN = 9
_HEADERS, _PUSH_PROMISE, _GOAWAY, _CONTINUATION = 0x1, 0x5, 0x7, 0x9
_END_HEADERS = 0x4


# Events. Headers are (name, value) byte pairs as they arrived, pseudo-headers first.

@dataclass(frozen=True, slots=True)
class RequestHeaders:
    """A request opened a stream (server side)."""

    stream_id: int
    headers: Headers
    end_stream: bool


@dataclass(frozen=True, slots=True)
class ResponseHeaders:
    """A response head (client side); a 1xx comes as one too, with end_stream False."""

    stream_id: int
    headers: Headers
    end_stream: bool


@dataclass(frozen=True, slots=True)
class Data:
    """Body bytes. Hand ``flow_controlled_length`` to ``acknowledge`` once they are forwarded."""

    stream_id: int
    data: bytes
    flow_controlled_length: int  # includes padding: the peer's window shrank by this much
    end_stream: bool


@dataclass(frozen=True, slots=True)
class Trailers:
    """Trailing headers, which end the stream (gRPC's ``grpc-status`` lives here)."""

    stream_id: int
    headers: Headers


@dataclass(frozen=True, slots=True)
class StreamReset:
    """A stream ended abnormally; other streams are unaffected.

    ``remote`` is False when h2 itself reset the stream for a stream-level error of the peer.
    REFUSED_STREAM after a GoAway means the peer never processed it: safe to retry elsewhere.
    """

    stream_id: int
    error_code: int
    remote: bool = True


@dataclass(frozen=True, slots=True)
class GoAway:
    """The peer will process no stream above ``last_stream_id``.

    Streams at or below it may still complete on this connection; open new ones elsewhere
    and close this connection (``close()``) once ``open_streams`` drops to zero.
    """

    last_stream_id: int
    error_code: int


@dataclass(frozen=True, slots=True)
class WindowOpened:
    """The peer gave send window back: retry what ``send_data`` did not take.

    Stream 0 means the connection window (or every stream's, after a SETTINGS change).
    """

    stream_id: int


@dataclass(frozen=True, slots=True)
class ProtocolViolation:
    """The peer broke HTTP/2. The endpoint is dead: flush ``data_to_send()`` (a GOAWAY), then close."""

    reason: str
    error_code: int


Event = (RequestHeaders | ResponseHeaders | Data | Trailers | StreamReset | GoAway | WindowOpened
         | ProtocolViolation)


class CannotOpenStream(RuntimeError):
    """No new stream may be opened on this connection; the message says why."""


class H2Endpoint:
    """One h2c connection (prior knowledge), as the proxy's downstream or upstream side.

    The proxy feeds received bytes to ``receive``, acts on the events, calls the ``send_*``
    methods and writes ``data_to_send()`` to the socket. Received DATA is only credited back
    to the peer when the proxy calls ``acknowledge`` after forwarding it, so a slow receiver
    on the far side throttles the sender on this side.
    """

    def __init__(self, client_side: bool, *, max_concurrent_streams: int = DEFAULT_MAX_CONCURRENT_STREAMS,
                 stream_window: int = DEFAULT_STREAM_WINDOW,
                 connection_window: int = DEFAULT_CONNECTION_WINDOW) -> None:
        if connection_window < _RFC_DEFAULT_WINDOW:
            raise ValueError(f"connection_window {connection_window} is below HTTP/2's initial 65535: "
                             "the connection window can only be grown")
        self.client_side = client_side
        # Inbound heads are validated (and normalized) by h2 as they arrive; what we send
        # is those heads forwarded, or heads we build: checking them again on the way
        # out cost a third of h2's header work per proxied request.
        config = h2.config.H2Configuration(client_side=client_side, header_encoding=None,
                                           validate_outbound_headers=False,
                                           normalize_outbound_headers=False)
        self._conn = h2.connection.H2Connection(config=config)
        settings = h2.settings.Settings(client=client_side, initial_values={
            SettingCodes.ENABLE_PUSH: 0,  # a proxy has nowhere to forward a pushed stream
            SettingCodes.INITIAL_WINDOW_SIZE: stream_window,
            SettingCodes.MAX_CONCURRENT_STREAMS: max_concurrent_streams,
            SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
        })
        # h2 would advertise extended CONNECT as 0, which says nothing: leave it out.
        del settings[SettingCodes.ENABLE_CONNECT_PROTOCOL]
        # Replaced before initiate_connection so that one SETTINGS frame carries our values.
        self._conn.local_settings = settings
        self._connection_window = connection_window
        self._goaway_filter = _GoAwayFilter(0 if client_side else _PREFACE_LEN)
        self._dead = False
        self._peer_last_stream_id: int | None = None  # from the peer's GOAWAY
        self._unacked: dict[int, int] = {}  # stream -> flow-controlled bytes not yet acknowledged

    # Connection

    def initiate(self) -> bytes:
        """The connection preface (client) and our SETTINGS; call once, first."""
        self._conn.initiate_connection()
        if self._connection_window > _RFC_DEFAULT_WINDOW:
            # SETTINGS cannot grow the connection window, only a WINDOW_UPDATE on stream 0.
            self._conn.increment_flow_control_window(self._connection_window - _RFC_DEFAULT_WINDOW)
        return self.data_to_send()

    def receive(self, data: bytes) -> list[Event]:
        """Feed bytes read from the socket; returns what they meant. Nothing after a violation."""
        if self._dead:
            return []
        events: list[Event] = []
        try:
            for piece in self._goaway_filter.split(data, self._conn.max_inbound_frame_size):
                if isinstance(piece, GoAway):
                    self._on_goaway(piece, events)
                else:
                    self._translate(self._conn.receive_data(piece), events)
        except h2.exceptions.ProtocolError as e:
            # h2 queues the GOAWAY itself, except for a bad preface, which it rejects before
            # its error handling; the peer gets one then too (RFC 9113 §3.4 allows it).
            if self._conn.state_machine.state is not ConnectionState.CLOSED:
                self._conn.close_connection(e.error_code)
            self._dead = True
            events.append(ProtocolViolation(str(e) or type(e).__name__, int(e.error_code)))
        return events

    def data_to_send(self) -> bytes:
        """Bytes to write to the socket now (may be empty)."""
        return self._conn.data_to_send()

    def close(self, error_code: int = ErrorCodes.NO_ERROR) -> None:
        """Send GOAWAY and end the connection; the endpoint is dead afterwards."""
        if self._dead:
            return
        self._dead = True
        self._conn.close_connection(error_code)

    @property
    def closed(self) -> bool:
        """True once the connection can carry nothing more (a violation either way, or close())."""
        return self._dead

    @property
    def open_streams(self) -> int:
        """Streams not yet closed both ways, either direction: drain until this is zero."""
        return self._conn.open_inbound_streams + self._conn.open_outbound_streams

    @property
    def can_open_stream(self) -> bool:
        """Whether ``new_stream_id`` would succeed: client side, alive, no GOAWAY, below the
        peer's concurrency limit."""
        return self._why_no_new_stream() is None

    # Streams

    def new_stream_id(self) -> int:
        """The id for the next request (client side). Use it at once: ids must open in order."""
        why = self._why_no_new_stream()
        if why is not None:
            raise CannotOpenStream(why)
        return self._conn.get_next_available_stream_id()

    def send_headers(self, stream_id: int, headers: Iterable[tuple[bytes | str, bytes | str]],
                     end_stream: bool = False) -> None:
        """Request or response head. Connection-specific headers are dropped (``to_h2_headers``)."""
        if self._dead or self._gone(stream_id):
            return
        self._conn.send_headers(stream_id, to_h2_headers(headers), end_stream=end_stream)

    def send_data(self, stream_id: int, data: bytes | bytearray | memoryview,
                  end_stream: bool = False) -> int:
        """Send as much of ``data`` as the flow-control windows allow; returns how many bytes went.

        The proxy keeps the rest and calls again on WindowOpened. ``end_stream`` takes effect only
        once all of ``data`` went. Returns 0 on a stream or connection that is gone.
        """
        if self._dead or self._gone(stream_id):
            return 0
        view = memoryview(data)
        allowed = min(len(view), self._conn.local_flow_control_window(stream_id))
        frame_size = self._conn.max_outbound_frame_size
        sent = 0
        while sent < allowed:
            chunk = view[sent:sent + min(frame_size, allowed - sent)]
            sent += len(chunk)
            self._conn.send_data(stream_id, chunk, end_stream=end_stream and sent == len(view))
        if end_stream and not view:
            self._conn.send_data(stream_id, b"", end_stream=True)
        return sent

    def send_trailers(self, stream_id: int, headers: Iterable[tuple[bytes | str, bytes | str]]) -> None:
        """Trailing headers, ending the stream (``grpc-status``, ``grpc-message``)."""
        self.send_headers(stream_id, headers, end_stream=True)

    def reset(self, stream_id: int, error_code: int = ErrorCodes.CANCEL) -> None:
        """RST_STREAM one stream; the connection and other streams carry on."""
        if self._dead:
            return
        if not self._gone(stream_id):  # else it is over already: nothing to tell the peer
            self._conn.reset_stream(stream_id, error_code)
        self._release(stream_id)

    def max_outbound(self, stream_id: int) -> int:
        """Bytes ``send_data`` would take now on this stream (0: the connection window)."""
        if self._dead:
            return 0
        if stream_id == 0:
            return self._conn.outbound_flow_control_window
        stream = self._conn.streams.get(stream_id)
        if stream is None or stream.closed:
            return 0
        return self._conn.local_flow_control_window(stream_id)

    def acknowledge(self, stream_id: int, flow_controlled_length: int) -> None:
        """Credit received DATA back to the peer once it has been forwarded (or dropped).

        h2 batches the WINDOW_UPDATEs. A reset stream's outstanding bytes are credited back
        to the connection at once, so a late acknowledge for it, or any beyond what is
        outstanding, does nothing.
        """
        owed = self._unacked.get(stream_id, 0)
        n = min(flow_controlled_length, owed)
        if n <= 0 or self._dead:
            return
        if n == owed:
            del self._unacked[stream_id]
        else:
            self._unacked[stream_id] = owed - n
        self._conn.acknowledge_received_data(n, stream_id)

    # Internals

    def _gone(self, stream_id: int) -> bool:
        """Whether a stream is over: sends to it are dropped quietly, because the peer may reset
        a stream while the proxy still has an answer for it in hand (its StreamReset event tells
        the proxy). h2 forgets closed streams, so one it no longer holds is over if its id is
        below the highest opened from that side."""
        stream = self._conn.streams.get(stream_id)
        if stream is not None:
            return stream.closed
        ours = (stream_id % 2 == 1) == self.client_side
        highest = self._conn.highest_outbound_stream_id if ours else self._conn.highest_inbound_stream_id
        return stream_id <= highest

    def _why_no_new_stream(self) -> str | None:
        if not self.client_side:
            return "a server-side endpoint opens no streams (server push is disabled)"
        if self._dead:
            return "the connection is closed"
        if self._peer_last_stream_id is not None:
            return f"the peer sent GOAWAY (last stream {self._peer_last_stream_id}): use a new connection"
        if self._conn.highest_outbound_stream_id + 2 > self._conn.HIGHEST_ALLOWED_STREAM_ID:
            return "stream ids are used up on this connection: use a new connection"
        limit = self._conn.remote_settings.max_concurrent_streams
        # h2 counts open streams by walking all of them: ask only when the cheap bound
        # (every stream it still holds, either direction) does not settle it.
        if len(self._conn.streams) >= limit and self._conn.open_outbound_streams >= limit:
            return f"the peer allows {limit} concurrent streams and all are in use"
        return None

    def _translate(self, h2_events: list[h2.events.Event], out: list[Event]) -> None:
        folded = {id(ev.stream_ended) for ev in h2_events if getattr(ev, "stream_ended", None) is not None}
        for ev in h2_events:
            ended = getattr(ev, "stream_ended", None) is not None
            if isinstance(ev, h2.events.DataReceived):
                # A DATA frame may be all padding: it still used window that must be credited back.
                self._unacked[ev.stream_id] = self._unacked.get(ev.stream_id, 0) + ev.flow_controlled_length
                out.append(Data(ev.stream_id, ev.data, ev.flow_controlled_length, ended))
            elif isinstance(ev, h2.events.RequestReceived):
                out.append(RequestHeaders(ev.stream_id, from_h2_headers(ev.headers), ended))
            elif isinstance(ev, h2.events.ResponseReceived):
                out.append(ResponseHeaders(ev.stream_id, from_h2_headers(ev.headers), ended))
            elif isinstance(ev, h2.events.InformationalResponseReceived):
                out.append(ResponseHeaders(ev.stream_id, from_h2_headers(ev.headers), False))
            elif isinstance(ev, h2.events.TrailersReceived):
                out.append(Trailers(ev.stream_id, from_h2_headers(ev.headers)))
            elif isinstance(ev, h2.events.StreamEnded):
                if id(ev) not in folded:  # h2 always pairs it with HEADERS or DATA; just in case
                    out.append(Data(ev.stream_id, b"", 0, True))
            elif isinstance(ev, h2.events.StreamReset):
                self._release(ev.stream_id)
                out.append(StreamReset(ev.stream_id, int(ev.error_code), ev.remote_reset))
            elif isinstance(ev, h2.events.WindowUpdated):
                out.append(WindowOpened(ev.stream_id))
            elif isinstance(ev, h2.events.RemoteSettingsChanged):
                change = ev.changed_settings.get(SettingCodes.INITIAL_WINDOW_SIZE)
                if change is not None and change.new_value > (change.original_value or 0):
                    out.append(WindowOpened(0))
            elif isinstance(ev, h2.events.ConnectionTerminated):
                # Only a GOAWAY the filter let through (malformed) gets here, and h2 is closed now.
                self._dead = True
                out.append(GoAway(ev.last_stream_id or 0, int(ev.error_code or 0)))
            # Pings and SETTINGS acks are answered by h2; priority, ALTSVC and unknown frames
            # mean nothing to a proxy.

    def _on_goaway(self, goaway: GoAway, out: list[Event]) -> None:
        last = goaway.last_stream_id
        if self._peer_last_stream_id is not None:
            last = min(last, self._peer_last_stream_id)  # a later GOAWAY may only lower it
        self._peer_last_stream_id = last
        out.append(goaway)
        own_parity = 1 if self.client_side else 0
        for stream_id, stream in list(self._conn.streams.items()):
            if stream_id % 2 == own_parity and stream_id > last and not stream.closed:
                # The peer never processed these: tell the proxy, which may retry them elsewhere.
                self._conn.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
                self._release(stream_id)
                out.append(StreamReset(stream_id, ErrorCodes.REFUSED_STREAM, remote=True))

    def _release(self, stream_id: int) -> None:
        # The proxy drops what it still buffers of a reset stream; without this credit those
        # bytes would shrink the connection window for good.
        owed = self._unacked.pop(stream_id, 0)
        if owed and not self._dead:
            self._conn.acknowledge_received_data(owed, stream_id)


class _GoAwayFilter:
    """Takes the peer's GOAWAY frames out of the byte stream before h2 sees them.

    h2 moves the whole connection to CLOSED on a received GOAWAY and then rejects the frames
    of the streams the peer promised to finish (python-hyper/h2#1181), which would fail every
    in-flight request when an upstream shuts down gracefully. This walks the 9-byte frame
    headers and hands h2 everything else unchanged; a malformed GOAWAY, or one inside a
    header block, goes to h2 so that it raises the protocol error.
    """

    def __init__(self, preface_len: int) -> None:
        self._skip = preface_len  # bytes that belong to h2 before the next frame header
        self._held = b""  # an incomplete frame header, or an incomplete GOAWAY frame
        self._in_header_block = False

    def split(self, data: bytes, max_frame_size: int) -> list[bytes | GoAway]:
        buf = self._held + data if self._held else data
        pieces: list[bytes | GoAway] = []
        start = pos = 0
        end = len(buf)
        while pos < end:
            if self._skip:
                step = min(self._skip, end - pos)
                pos += step
                self._skip -= step
                continue
            if end - pos < _FRAME_HEADER_LEN:
                break
            length = int.from_bytes(buf[pos:pos + 3], "big")
            ftype, flags = buf[pos + 3], buf[pos + 4]
            stream_id = int.from_bytes(buf[pos + 5:pos + 9], "big") & 0x7FFFFFFF
            if (ftype == _GOAWAY and not self._in_header_block and stream_id == 0
                    and 8 <= length <= max_frame_size):
                if end - pos < _FRAME_HEADER_LEN + length:
                    break
                if pos > start:
                    pieces.append(buf[start:pos])
                body = pos + _FRAME_HEADER_LEN
                pieces.append(GoAway(int.from_bytes(buf[body:body + 4], "big") & 0x7FFFFFFF,
                                     int.from_bytes(buf[body + 4:body + 8], "big")))
                pos = start = body + length
                continue
            if ftype in (_HEADERS, _PUSH_PROMISE):
                self._in_header_block = not flags & _END_HEADERS
            elif ftype == _CONTINUATION and self._in_header_block:
                self._in_header_block = not flags & _END_HEADERS
            pos += _FRAME_HEADER_LEN
            self._skip = length
        if pos > start:
            pieces.append(buf if start == 0 and pos == end else buf[start:pos])
        self._held = bytes(buf[pos:])
        return pieces


# Headers

# RFC 9113 §8.2.2: connection-specific fields must not appear in HTTP/2; http2-settings belongs
# to the HTTP/1.1 upgrade to h2c.
_CONNECTION_SPECIFIC = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                                  b"upgrade", b"http2-settings"})


def to_h2_headers(headers: Iterable[tuple[bytes | str, bytes | str]]) -> Headers:
    """Headers fit for HTTP/2 from any (name, value) list, e.g. one parsed from HTTP/1.1.

    Names lowercased; pseudo-headers first, in their order; connection-specific headers and
    any header the Connection header names dropped; ``te`` kept only as ``trailers`` (gRPC
    needs it).
    """
    pairs = [(_as_bytes(name).lower(), _as_bytes(value).strip(b" \t")) for name, value in headers]
    named_by_connection = {token for name, value in pairs if name == b"connection"
                           for token in _tokens(value)} - {b"te"}
    pseudo: list[Header] = []
    regular: list[Header] = []
    te_trailers = False
    for name, value in pairs:
        if name.startswith(b":"):
            pseudo.append((name, value))
        elif name == b"te":
            te_trailers = te_trailers or b"trailers" in _tokens(value)
        elif name not in _CONNECTION_SPECIFIC and name not in named_by_connection:
            regular.append((name, value))
    if te_trailers:
        regular.append((b"te", b"trailers"))
    return tuple(pseudo + regular)


def from_h2_headers(headers: Iterable[tuple[bytes | str, bytes | str]]) -> Headers:
    """h2's header tuples as plain immutable (name, value) byte pairs."""
    return tuple((_as_bytes(name), _as_bytes(value)) for name, value in headers)


def is_grpc(headers: Iterable[Header]) -> bool:
    """Whether a request or response is gRPC: content-type application/grpc, +proto and the like.

    gRPC-Web (application/grpc-web) is not: its trailers travel in the body.
    """
    content_type = _first(headers, b"content-type")
    if content_type is None:
        return False
    content_type = content_type.lower()
    return content_type == b"application/grpc" or content_type.startswith((b"application/grpc+",
                                                                           b"application/grpc;"))


def grpc_status(headers: Iterable[Header]) -> int | None:
    """The gRPC status code from trailers (or from the headers of a trailers-only response)."""
    value = _first(headers, b"grpc-status")
    if value is None or not value.strip().isdigit():
        return None
    return int(value)


def _first(headers: Iterable[Header], name: bytes) -> bytes | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def _tokens(value: bytes) -> set[bytes]:
    return {token.strip().lower() for token in value.split(b",") if token.strip()}


def _as_bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)
