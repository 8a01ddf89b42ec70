"""HTTP/1.1 for the node proxy: sans-IO request and response parsers on httptools (llhttp).

Bytes in, events out (``http1_events``); serializers in ``http1_serialize``. No sockets,
no asyncio, no clocks: the proxy feeds what it read and acts on the events. llhttp runs in
its strict mode, so the smuggling shapes (Content-Length with Transfer-Encoding, duplicate
Content-Length, bad chunk sizes, bare LF, obs-fold) are errors, never guesses.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Literal

import httptools

from dataplane.protocols.http1_events import (
    Body,
    EndOfMessage,
    Event,
    Framing,
    Header,
    Headers,
    ProtocolError,
    RequestHead,
    ResponseHead,
    Upgraded,
    tokens,
    values,
)
from dataplane.protocols.http1_serialize import (
    HOP_BY_HOP,
    end_to_end,
    framing_for_peer,
    serialize_chunk,
    serialize_last_chunk,
    serialize_request_head,
    serialize_response_head,
    simple_response,
)

__all__ = [
    "HOP_BY_HOP", "MAX_HEAD", "Body", "EndOfMessage", "Event", "Framing", "Headers", "ProtocolError",
    "RequestHead", "RequestParser", "ResponseHead", "ResponseParser", "Upgraded", "end_to_end",
    "framing_for_peer", "serialize_chunk", "serialize_last_chunk", "serialize_request_head",
    "serialize_response_head", "simple_response",
]

MAX_HEAD = 64 * 1024  # a head (or chunk line, or trailer section) this large is always accepted
SLICE = 16 * 1024  # llhttp is fed at most this much at a time; see _Parser._count

Phase = Literal["idle", "head", "body", "tunnel", "closed", "error"]


class _Reject(Exception):
    """Raised inside an llhttp callback to turn the message into a ProtocolError."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class _Closed(Exception):
    """Raised inside a callback when bytes arrive after a Connection: close message."""


def _framing_of(headers: Headers, error_status: int) -> tuple[Framing, int | None]:
    """The framing the headers declare ("none" when neither header is there). llhttp has
    already refused both headers together, duplicate or malformed Content-Length."""
    te = tokens(headers, b"transfer-encoding")
    if te:
        # Only chunked: another transfer-coding would have to be undone or passed on with
        # its header, and the proxy re-frames bodies (as Envoy, it answers 501 instead).
        if te != [b"chunked"]:
            raise _Reject(error_status, f"Transfer-Encoding {b', '.join(te).decode('latin-1')!r} "
                                        "is not supported: only chunked")
        return "chunked", None
    return ("length", _declared_length(headers)) if values(headers, b"content-length") else ("none", None)


def _declared_length(headers: Headers) -> int | None:
    lengths = values(headers, b"content-length")
    return int(lengths[0]) if lengths else None  # llhttp has checked it is one number


def _keep_alive(version: str, headers: Headers) -> bool:
    connection = tokens(headers, b"connection")
    if version == "1.1":
        return b"close" not in connection
    # RFC 9112 6.1: Transfer-Encoding in HTTP/1.0 is suspect framing; serve it, then close.
    if values(headers, b"transfer-encoding"):
        return False
    return b"keep-alive" in connection and b"close" not in connection


def _coalesce(events: list[Event]) -> list[Event]:
    """Join adjacent Body events: llhttp reports one per chunk or per slice, the proxy
    would rather write once."""
    out: list[Event] = []
    pending: list[bytes] = []
    for ev in events:
        if isinstance(ev, Body):
            pending.append(ev.data)
            continue
        if pending:
            out.append(Body(b"".join(pending)))
            pending = []
        out.append(ev)
    if pending:
        out.append(Body(b"".join(pending)))
    return out


class _Parser:
    """What both directions share: the llhttp instance, the callbacks that turn its spans
    into events, error handling and the head-size bound."""

    _KIND = "message"
    _ERROR_STATUS = 400

    def __init__(self, max_head: int = MAX_HEAD) -> None:
        self._events: list[Event] = []
        self._phase: Phase = "idle"
        self._error: ProtocolError | None = None
        self._head: RequestHead | ResponseHead | None = None
        self._headers: list[Header] = []
        self._trailers: list[Header] = []
        self._remaining: int | None = None  # body bytes still due under Content-Length
        # llhttp keeps no limit on a head's size. We count the bytes fed since the last
        # sign of progress (head complete, body, chunk, end): a stall that long is an
        # oversized head, chunk line or trailer section. Feeding SLICE at a time bounds
        # the overcount, so heads up to max_head always pass and none beyond
        # max_head + SLICE is ever held.
        self._limit = max_head + SLICE
        self._max_head = max_head
        self._stalled = 0
        self._progressed = False
        self._ll = self._new_ll()

    # --- public ----------------------------------------------------------------------

    @property
    def phase(self) -> Phase:
        """idle (between messages), head, body, tunnel (after an upgrade), closed (no
        more messages on this connection) or error."""
        return self._phase

    @property
    def error(self) -> ProtocolError | None:
        return self._error

    # --- llhttp plumbing -------------------------------------------------------------

    def _new_ll(self) -> httptools.HttpRequestParser | httptools.HttpResponseParser:
        raise NotImplementedError

    def _callbacks(self) -> SimpleNamespace:
        # A separate object, so that the on_* names httptools looks up stay off our API.
        return SimpleNamespace(
            on_message_begin=self._on_message_begin, on_header=self._on_header,
            on_headers_complete=self._on_headers_complete, on_body=self._on_body,
            on_message_complete=self._on_message_complete, on_chunk_header=self._on_progress,
            on_chunk_complete=self._on_progress, on_url=self._on_url, on_status=self._on_status)

    def _feed_ll(self, piece: memoryview) -> None:
        self._progressed = False
        try:
            self._ll.feed_data(piece)
        finally:
            self._count(len(piece))

    def _count(self, n: int) -> None:
        self._stalled = n if self._progressed else self._stalled + n
        if self._stalled > self._limit and self._phase in ("idle", "head", "body"):
            what = "head" if self._phase != "body" else "chunk line or trailer section"
            status = 431 if self._phase != "body" and self._ERROR_STATUS == 400 else self._ERROR_STATUS
            raise _Reject(status, f"{self._KIND} {what} larger than {self._max_head} bytes")

    def _parser_error(self, exc: httptools.HttpParserError) -> None:
        if self._phase == "closed":
            return  # bytes after a Connection: close message: nobody will answer them
        cause = exc.__context__
        if isinstance(cause, _Reject):
            self._fail(cause.status, cause.reason)
        elif cause is not None and not isinstance(cause, _Closed | httptools.HttpParserError):
            raise cause  # a bug of ours in a callback: do not disguise it as the peer's
        else:
            self._fail(self._ERROR_STATUS, f"malformed HTTP/1.1 {self._KIND}: {exc}")

    def _fail(self, status: int, reason: str) -> None:
        self._error = ProtocolError(status, reason)
        self._phase = "error"
        self._events.append(self._error)

    # --- callbacks -------------------------------------------------------------------

    def _on_message_begin(self) -> None:
        if self._phase == "closed":
            raise _Closed()
        self._phase = "head"
        self._headers = []
        self._trailers = []

    def _on_url(self, piece: bytes) -> None:
        raise NotImplementedError

    def _on_status(self, piece: bytes) -> None:
        raise NotImplementedError

    def _on_header(self, name: bytes, value: bytes) -> None:
        # llhttp strips leading whitespace of a value but not trailing (RFC 9112 5: OWS).
        field = (name.lower(), value.rstrip(b" \t"))
        (self._headers if self._phase == "head" else self._trailers).append(field)

    def _on_headers_complete(self) -> None:
        raise NotImplementedError

    def _on_body(self, data: bytes) -> None:
        self._progressed = True
        if self._remaining is not None:
            self._remaining -= len(data)
        self._events.append(Body(data))

    def _on_progress(self) -> None:
        self._progressed = True

    def _on_message_complete(self) -> None:
        raise NotImplementedError

    def _start_body(self, head: RequestHead | ResponseHead) -> None:
        self._progressed = True
        self._head = head
        self._remaining = head.content_length if head.framing == "length" else None
        self._phase = "body"
        self._events.append(head)

    def _end_message(self) -> None:
        self._progressed = True
        head = self._head
        assert head is not None
        self._events.append(EndOfMessage(tuple(self._trailers)))
        self._trailers = []
        self._remaining = None
        if head.upgrade:
            self._phase = "tunnel"
        else:
            self._phase = "idle" if head.keep_alive else "closed"


class RequestParser(_Parser):
    """The downstream side: requests from a client, pipelined ones in order. Emits
    RequestHead, Body*, EndOfMessage per request; after an Upgrade or CONNECT request,
    Upgraded with every later byte. ``Upgrade: h2c`` is not honoured (as in Envoy): the
    request goes on as plain HTTP/1.1, so the proxy keeps seeing requests."""

    _KIND = "request"
    _ERROR_STATUS = 400

    def __init__(self, max_head: int = MAX_HEAD) -> None:
        self._url: list[bytes] = []
        self._h2c_body: tuple[Framing, int | None] | None = None
        self._priming = False
        super().__init__(max_head)

    def _new_ll(self) -> httptools.HttpRequestParser:
        return httptools.HttpRequestParser(self._callbacks())

    def feed(self, data: bytes) -> list[Event]:
        """Bytes read from the client; the events they complete."""
        if self._error is not None:
            return [self._error]
        if self._phase == "tunnel":
            return [Upgraded(bytes(data))] if data else []
        if self._phase == "closed":
            return []  # the client sent more after Connection: close; it gets no answer
        self._events = []
        view = memoryview(data)
        pos = 0
        try:
            while pos < len(view) and self._phase in ("idle", "head", "body"):
                piece = view[pos:pos + SLICE]
                try:
                    self._feed_ll(piece)
                    pos += len(piece)
                except httptools.HttpParserUpgrade as up:
                    pos += int(up.args[0])
                    if self._phase == "tunnel":
                        self._events.append(Upgraded(bytes(view[pos:])))
                    else:
                        self._resume_after_h2c()
                except httptools.HttpParserError as exc:
                    self._parser_error(exc)
        except _Reject as rej:
            self._fail(rej.status, rej.reason)
        return _coalesce(self._events)

    def feed_eof(self) -> list[Event]:
        """The client closed its side. In the middle of a request that is an error."""
        if self._error is not None:
            return [self._error]
        self._events = []
        if self._phase in ("head", "body"):
            self._fail(400, "the client closed the connection in the middle of a request")
        elif self._phase == "idle":
            self._phase = "closed"
        return self._events

    def _resume_after_h2c(self) -> None:
        # llhttp stops at every upgrade, h2c too, and skips the body of an upgrade request;
        # we carry on with a fresh parser, primed with a synthetic head of the same framing
        # when the request has a body, so that llhttp still decodes (and checks) that body.
        self._ll = self._new_ll()
        if self._h2c_body is not None:
            framing, length = self._h2c_body
            self._h2c_body = None
            synthetic = (b"POST / HTTP/1.1\r\nHost: h2c\r\nTransfer-Encoding: chunked\r\n\r\n"
                         if framing == "chunked" else
                         b"POST / HTTP/1.1\r\nHost: h2c\r\nContent-Length: %d\r\n\r\n" % (length or 0))
            self._priming = True
            try:
                self._ll.feed_data(synthetic)
            finally:
                self._priming = False

    def _on_message_begin(self) -> None:
        if not self._priming:
            super()._on_message_begin()
            self._url = []

    def _on_url(self, piece: bytes) -> None:
        if not self._priming:
            self._url.append(piece)

    def _on_status(self, piece: bytes) -> None:  # pragma: no cover - requests have none
        pass

    def _on_header(self, name: bytes, value: bytes) -> None:
        if not self._priming:
            super()._on_header(name, value)

    def _on_headers_complete(self) -> None:
        if self._priming:
            return
        headers = tuple(self._headers)
        version = self._ll.get_http_version()
        if version not in ("1.0", "1.1"):
            raise _Reject(505, f"HTTP/{version} is not HTTP/1.x")
        method = self._ll.get_method()
        framing, length = _framing_of(headers, 501)
        hosts = values(headers, b"host")
        # RFC 9112 3.2: routing by authority needs exactly one Host in HTTP/1.1.
        if len(hosts) > 1 or (version == "1.1" and not hosts):
            raise _Reject(400, f"an HTTP/1.1 request needs exactly one Host header, got {len(hosts)}")
        upgrade = method == b"CONNECT" or self._ll.should_upgrade()
        has_body = framing == "chunked" or bool(length)
        if upgrade and method != b"CONNECT" and set(tokens(headers, b"upgrade")) == {b"h2c"}:
            upgrade = False
            self._h2c_body = (framing, length) if has_body else None
        elif upgrade and has_body:
            # The body and the tunnel would be told apart only by the upstream's answer:
            # a smuggling vector, and no real client needs it.
            raise _Reject(400, "an Upgrade or CONNECT request must not have a body")
        self._start_body(RequestHead(
            version=version, headers=headers, keep_alive=_keep_alive(version, headers),
            upgrade=upgrade, framing=framing, content_length=length,
            method=method, target=b"".join(self._url)))

    def _on_message_complete(self) -> None:
        if self._h2c_body is not None:
            return  # llhttp skipped the body of an h2c upgrade: the primed parser ends it
        self._end_message()


@dataclass(frozen=True, slots=True)
class _Expected:
    method: bytes
    upgrade: bool


class ResponseParser(_Parser):
    """The upstream side: responses, matched in order to the requests the proxy sent
    (``expect`` before writing each request). Emits ResponseHead, Body*, EndOfMessage per
    response, 1xx responses included; after 101 or a 2xx to CONNECT, Upgraded."""

    _KIND = "response"
    _ERROR_STATUS = 502

    def __init__(self, max_head: int = MAX_HEAD) -> None:
        self._reason: list[bytes] = []
        self._expected: deque[_Expected] = deque()
        self._cut = False  # the head just parsed ends its message, whatever llhttp thinks
        self._tail = b""  # the last bytes fed of a head in progress, to find its end
        super().__init__(max_head)

    def _new_ll(self) -> httptools.HttpResponseParser:
        return httptools.HttpResponseParser(self._callbacks())

    @property
    def idle(self) -> bool:
        """No response pending or in progress, and the connection may carry another
        request: a pool may reuse it."""
        return self._phase == "idle" and not self._expected

    def expect(self, method: bytes, *, upgrade: bool = False) -> None:
        """Announce a request written to the upstream (call it before writing): its
        method decides whether the response has a body (HEAD) or opens a tunnel
        (CONNECT); ``upgrade`` says the request asked for an Upgrade."""
        if self._phase in ("closed", "tunnel", "error"):
            raise RuntimeError(f"upstream connection is {self._phase}: open a new one for this request")
        self._expected.append(_Expected(method.upper(), upgrade))

    def feed(self, data: bytes) -> list[Event]:
        """Bytes read from the upstream; the events they complete."""
        if self._error is not None:
            return [self._error]
        if self._phase == "tunnel":
            return [Upgraded(bytes(data))] if data else []
        if self._phase == "closed":
            return []  # after Connection: close nothing more is a response to anything
        self._events = []
        view = memoryview(data)
        pos = 0
        try:
            while pos < len(view) and self._phase in ("idle", "head", "body"):
                n = self._step(view, pos)
                try:
                    self._feed_ll(view[pos:pos + n])
                    pos += n
                    # Remember how a head in progress ends, to find its blank line across feeds.
                    fed = self._tail + bytes(view[pos - min(n, 3):pos])
                    self._tail = fed[-3:] if self._phase == "head" else b""
                except httptools.HttpParserUpgrade as up:
                    pos += int(up.args[0])
                except httptools.HttpParserError as exc:
                    self._parser_error(exc)
                    break
                if self._cut:
                    self._finish_cut()
                if self._phase == "tunnel":
                    self._events.append(Upgraded(bytes(view[pos:])))
        except _Reject as rej:
            self._fail(rej.status, rej.reason)
        return _coalesce(self._events)

    def feed_eof(self) -> list[Event]:
        """The upstream closed its side: the end of a body that runs to EOF, otherwise an
        error for whatever was pending (502: the caller may retry where safe)."""
        if self._error is not None:
            return [self._error]
        self._events = []
        head = self._head
        if self._phase == "body" and head is not None and head.framing == "eof":
            self._end_message()
            self._expected.popleft()
            self._phase = "closed"
        elif self._phase in ("head", "body"):
            self._fail(502, "the upstream closed the connection in the middle of a response")
        elif self._phase == "idle" and self._expected:
            self._fail(502, "the upstream closed the connection before responding")
        elif self._phase == "idle":
            self._phase = "closed"
        return self._events

    def _step(self, view: memoryview, pos: int) -> int:
        """How many bytes to feed next. Normally a slice; but a response to HEAD or CONNECT
        must be cut right after its head, where llhttp (which does not know the method)
        would read on. So while such a response is pending, messages are fed to their exact
        end: heads up to their blank line, bodies by Content-Length, chunked bodies byte by
        byte (only in that rare case: a HEAD pipelined behind a chunked response)."""
        avail = min(len(view) - pos, SLICE)
        if not any(e.method in (b"HEAD", b"CONNECT") for e in self._expected):
            return avail
        if self._phase in ("idle", "head"):
            window = self._tail + bytes(view[pos:pos + avail])
            end = window.find(b"\r\n\r\n")
            return end + 4 - len(self._tail) if end >= 0 else avail
        head = self._head
        if self._remaining is not None:
            return max(1, min(self._remaining, avail))
        if head is not None and head.framing == "eof":
            return avail
        return 1

    def _finish_cut(self) -> None:
        self._cut = False
        if self._phase in ("head", "body"):
            # llhttp waits for a body that will not come: end the message ourselves, and
            # give the next response a parser that never saw this head.
            self._end_message()
            self._expected.popleft()
            self._ll = self._new_ll()

    def _on_message_begin(self) -> None:
        super()._on_message_begin()
        self._reason = []

    def _on_url(self, piece: bytes) -> None:  # pragma: no cover - responses have none
        pass

    def _on_status(self, piece: bytes) -> None:
        self._reason.append(piece)

    def _on_headers_complete(self) -> None:
        headers = tuple(self._headers)
        status = self._ll.get_status_code()
        version = self._ll.get_http_version()
        if version not in ("1.0", "1.1"):
            raise _Reject(502, f"the upstream answered in HTTP/{version}, not HTTP/1.x")
        if not self._expected:
            raise _Reject(502, f"the upstream sent a {status} response to no request")
        expected = self._expected[0]
        informational = 100 <= status < 200 and status != 101
        tunnel = status == 101 or (expected.method == b"CONNECT" and 200 <= status < 300)
        if status == 101 and not expected.upgrade:
            raise _Reject(502, "the upstream switched protocols (101) for a request that did not ask to")
        framing: Framing
        if informational or tunnel or status in (204, 304) or expected.method == b"HEAD":
            # RFC 9110 6.4.1 / 9.3.2: no body, whatever the headers say; a length they
            # declare describes the representation and is kept for forwarding.
            framing, length = "none", _declared_length(headers)
            # llhttp knows status codes but not methods: it would read on after the head.
            self._cut = expected.method in (b"HEAD", b"CONNECT") and not informational and status != 101
        else:
            framing, length = _framing_of(headers, 502)
            if framing == "none":
                framing = "eof"  # RFC 9112 6.3: no length, so the body runs to the close
        keep_alive = _keep_alive(version, headers) and framing != "eof"
        self._start_body(ResponseHead(
            version=version, headers=headers, keep_alive=keep_alive, upgrade=tunnel,
            framing=framing, content_length=length, status=status, reason=b"".join(self._reason)))

    def _on_message_complete(self) -> None:
        head = self._head
        assert isinstance(head, ResponseHead)
        self._end_message()
        if head.informational:
            self._phase = "idle"  # the final response to the same request follows
        else:
            self._cut = False
            self._expected.popleft()
