"""Writing HTTP/1.1: heads, chunks and the proxy's own small responses, by the rules of a
proxy. Hop-by-hop headers are never forwarded; the body framing is written from one
decision (the ``framing`` argument), so Content-Length and Transfer-Encoding can never
disagree with the body that follows. Always speaks HTTP/1.1 on the wire."""

from __future__ import annotations

import re
from collections.abc import Iterable
from http import HTTPStatus

from dataplane.protocols.http1_events import Framing, Header, tokens

# RFC 9110 7.6.1, plus the pre-standard Keep-Alive and Proxy-Connection.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                        b"transfer-encoding", b"upgrade"})
# A Connection header may nominate more hop-by-hop fields, but never these: a client must
# not be able to strip what routing (Host) or framing depends on.
_NEVER_NOMINATED = frozenset({b"host", b"content-length"})

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_IN_VALUE = re.compile(rb"[\x00\r\n]")
_BAD_IN_TARGET = re.compile(rb"[\x00-\x20\x7f]")


def end_to_end(headers: Iterable[Header]) -> list[Header]:
    """The headers to forward: names in lower case, without hop-by-hop fields, without
    those the Connection header nominates, and without Content-Length (the serializer
    writes the framing itself)."""
    lowered = tuple((n.lower(), v) for n, v in headers)
    nominated = set(tokens(lowered, b"connection")) - _NEVER_NOMINATED
    drop = HOP_BY_HOP | nominated | {b"content-length"}
    return [(n, v) for n, v in lowered if n not in drop]


def framing_for_peer(framing: Framing, peer_version: str) -> Framing:
    """The framing to use towards a peer: an HTTP/1.0 client cannot read chunked, so an
    unknown-length body goes to it delimited by closing the connection."""
    return "eof" if framing == "chunked" and peer_version == "1.0" else framing


def _check_field(name: bytes, value: bytes) -> None:
    # Names and values may come from config or from HTTP/2 peers: never let one smuggle a
    # line break (response splitting) into what we write.
    if not _TOKEN.fullmatch(name):
        raise ValueError(f"header name {name!r} is not an HTTP token")
    if _BAD_IN_VALUE.search(value):
        raise ValueError(f"header {name.decode('latin-1')}: value {value!r} contains CR, LF or NUL")


def _lines(start: bytes, fields: Iterable[Header]) -> bytes:
    out = [start]
    for name, value in fields:
        _check_field(name, value)
        out.append(name + b": " + value)
    out.append(b"\r\n")
    return b"\r\n".join(out)


def _framing_fields(framing: Framing, content_length: int | None) -> list[Header]:
    if framing == "length":
        if content_length is None or content_length < 0:
            raise ValueError(f"framing 'length' needs a content_length >= 0, got {content_length!r}")
        return [(b"content-length", b"%d" % content_length)]
    if framing == "chunked":
        return [(b"transfer-encoding", b"chunked")]
    return []


def serialize_request_head(method: bytes, target: bytes, headers: Iterable[Header], *,
                           framing: Framing = "none", content_length: int | None = None,
                           keep_alive: bool = True, upgrade: bytes | None = None) -> bytes:
    """A request head for the upstream. ``upgrade`` (``websocket``) forwards an Upgrade
    request: Connection and Upgrade are written for it, as every hop-by-hop field is
    dropped from ``headers``. ``keep_alive=False`` asks the upstream to close."""
    if not _TOKEN.fullmatch(method):
        raise ValueError(f"request method {method!r} is not an HTTP token")
    if not target or _BAD_IN_TARGET.search(target):
        raise ValueError(f"request target {target!r} is empty or has spaces or control bytes")
    if framing == "eof":
        raise ValueError("a request body cannot be delimited by closing the connection")
    if framing == "none" and content_length is not None:
        raise ValueError("a request without a body has no content_length: use framing 'length'")
    fields = end_to_end(headers) + _framing_fields(framing, content_length)
    fields += _connection_fields(keep_alive, upgrade, peer_version="1.1")
    return _lines(b"%s %s HTTP/1.1" % (method, target), fields)


def serialize_response_head(status: int, reason: bytes, headers: Iterable[Header], *,
                            framing: Framing = "none", content_length: int | None = None,
                            keep_alive: bool = True, upgrade: bytes | None = None,
                            peer_version: str = "1.1") -> bytes:
    """A response head for the client. ``framing`` says how the body that follows is
    delimited: "eof" closes the connection after it; "none" with a ``content_length``
    keeps the length a HEAD or 304 response declares. 1xx and 204 never carry framing
    fields (RFC 9110 8.6). ``peer_version`` "1.0" needs ``framing_for_peer`` first."""
    if not 100 <= status <= 999:
        raise ValueError(f"status {status} is not a three-digit HTTP status")
    if _BAD_IN_VALUE.search(reason):
        raise ValueError(f"reason phrase {reason!r} contains CR, LF or NUL")
    if framing == "chunked" and peer_version == "1.0":
        raise ValueError("an HTTP/1.0 client cannot read chunked: use framing_for_peer()")
    fields = end_to_end(headers)
    if status < 200 or status == 204:
        if framing != "none":
            raise ValueError(f"a {status} response has no body, so framing must be 'none'")
    elif framing == "none" and content_length is not None:
        fields.append((b"content-length", b"%d" % content_length))
    else:
        fields += _framing_fields(framing, content_length)
    fields += _connection_fields(keep_alive and framing != "eof", upgrade, peer_version)
    return _lines(b"HTTP/1.1 %d %s" % (status, reason), fields)


def _connection_fields(keep_alive: bool, upgrade: bytes | None, peer_version: str) -> list[Header]:
    if upgrade is not None:
        return [(b"connection", b"upgrade"), (b"upgrade", upgrade)]
    if not keep_alive:
        return [(b"connection", b"close")]
    if peer_version == "1.0":
        return [(b"connection", b"keep-alive")]  # HTTP/1.0 closes unless told otherwise
    return []


def serialize_chunk(data: bytes) -> bytes:
    """One chunk of a chunked body. Empty data writes nothing: a zero-size chunk would
    end the body."""
    if not data:
        return b""
    return b"%x\r\n%s\r\n" % (len(data), data)


def serialize_last_chunk(trailers: Iterable[Header] = ()) -> bytes:
    """The end of a chunked body, with its trailer fields (hop-by-hop ones dropped)."""
    return b"0\r\n" + _lines(b"", end_to_end(trailers))[2:]


def simple_response(status: int, reason: bytes | str | None = None, body: bytes = b"",
                    headers: Iterable[Header] = (), *, close: bool = False) -> bytes:
    """A whole response the proxy answers itself (400, 404, 429, 503, 504...), with its
    Content-Length; ``close`` adds ``connection: close`` (after a ProtocolError, say)."""
    if reason is None:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "Unknown"
    if isinstance(reason, str):
        reason = reason.encode("latin-1")
    fields = list(headers)
    if body and not any(n.lower() == b"content-type" for n, _ in fields):
        fields.append((b"content-type", b"text/plain; charset=utf-8"))
    framing: Framing = "none" if status < 200 or status in (204, 304) else "length"
    head = serialize_response_head(status, reason, fields, framing=framing,
                                   content_length=len(body) if framing == "length" else None,
                                   keep_alive=not close)
    return head + (body if framing == "length" else b"")
