"""The events the HTTP/1.1 parsers emit: immutable values a proxy can route on,
forward or log, with the header-reading rules (lists, tokens) shared by both sides."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Header = tuple[bytes, bytes]
Headers = tuple[Header, ...]

# How a message's body is delimited on the wire it arrived on:
#   none     no body follows (GET, HEAD responses, 1xx/204/304, CONNECT/101 before the tunnel)
#   length   Content-Length bytes follow
#   chunked  Transfer-Encoding: chunked
#   eof      responses only: the body runs until the server closes the connection
Framing = Literal["none", "length", "chunked", "eof"]


def values(headers: Headers, name: bytes) -> list[bytes]:
    """All values of one header (``name`` in lower case), in order."""
    return [v for n, v in headers if n == name]


def tokens(headers: Headers, name: bytes) -> list[bytes]:
    """A comma-separated list header split into lower-case tokens (``Connection``,
    ``Upgrade``, ``Transfer-Encoding``), across repeated header lines."""
    out: list[bytes] = []
    for value in values(headers, name):
        out.extend(t.strip(b" \t").lower() for t in value.split(b",") if t.strip(b" \t"))
    return out


@dataclass(frozen=True, slots=True)
class _Head:
    """What requests and responses share. Header names are lower case (as HTTP/2
    needs them, and so that routing compares bytes); values are as received."""

    version: str
    headers: Headers
    keep_alive: bool  # the connection may carry another message after this one
    upgrade: bool  # after this message's EndOfMessage the connection is a raw tunnel
    framing: Framing
    content_length: int | None  # the declared Content-Length, if any

    def get(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lower case), or None."""
        for n, v in self.headers:
            if n == name:
                return v
        return None

    @property
    def chunked(self) -> bool:
        return self.framing == "chunked"


@dataclass(frozen=True, slots=True)
class RequestHead(_Head):
    method: bytes
    target: bytes  # as sent: origin-form (/a?b), absolute-form, authority-form (CONNECT) or *

    @property
    def upgrade_to(self) -> bytes | None:
        """The protocol an Upgrade request asks for (``websocket``); None for CONNECT
        and ordinary requests."""
        return self.get(b"upgrade") if self.upgrade and self.method != b"CONNECT" else None


@dataclass(frozen=True, slots=True)
class ResponseHead(_Head):
    status: int
    reason: bytes

    @property
    def informational(self) -> bool:
        """1xx other than 101: the final response for the same request follows."""
        return 100 <= self.status < 200 and self.status != 101


@dataclass(frozen=True, slots=True)
class Body:
    """A piece of body, decoded from its framing (chunk sizes removed)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class EndOfMessage:
    trailers: Headers = ()  # trailer fields of a chunked body, names in lower case


@dataclass(frozen=True, slots=True)
class Upgraded:
    """Bytes after an upgrade (101, or CONNECT accepted): no longer HTTP/1.1. Emitted once
    when the switch happens (possibly empty), then for every later feed."""

    data: bytes


@dataclass(frozen=True, slots=True)
class ProtocolError:
    """The peer broke HTTP/1.1. ``status`` is what the proxy should answer with (400-class
    for a client, 502 for an upstream); the parser accepts no more input after it."""

    status: int
    reason: str


Event = RequestHead | ResponseHead | Body | EndOfMessage | Upgraded | ProtocolError
