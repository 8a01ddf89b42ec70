"""Which protocol a new connection speaks: what its Service port declares (Istio's rules),
else a sniff of the first bytes the client sends. Sans-IO: the caller owns the socket and
the clock of the sniff window; this module only looks at names and bytes."""

from __future__ import annotations

import re
from typing import Literal

Protocol = Literal["http1", "http2", "grpc", "tcp", "tls"]

# appProtocol values and port-name prefixes, as Istio's protocol.Parse reads them
# (case-insensitive), mapped onto what the node proxy can do with them. Databases and
# queues get opaque TCP: their filters are not ours to reimplement.
_DECLARED: dict[str, Protocol] = {
    "http": "http1",
    "http_proxy": "http1",
    "http2": "http2",
    "h2c": "http2",
    "grpc": "grpc",
    "grpc-web": "grpc",  # Istio counts gRPC-Web as gRPC (IsGRPC, IsHTTP2), as translate.py does
    "tcp": "tcp",
    "udp": "tcp",  # Istio ignores a "udp" name on a TCP port and keeps TCP
    "mysql": "tcp",
    "redis": "tcp",
    "mongo": "tcp",
    "tls": "tls",
    "https": "tls",  # TLS end to end: the proxy cannot read it, it can only forward it
}

# Kubernetes' standard appProtocol names (only valid as appProtocol, never as a port name).
_KUBERNETES_APP_PROTOCOLS: dict[str, Protocol] = {
    "kubernetes.io/h2c": "http2",
    "kubernetes.io/ws": "http1",
    "kubernetes.io/wss": "tls",
}

# Istio never sniffs these ports when nothing is declared: their servers speak first (SMTP,
# MySQL, MongoDB) or they are DNS, so a sniff window would only add delay.
SERVER_FIRST_PORTS = frozenset({25, 53, 3306, 27017})


def declared(app_protocol: str | None, port_name: str, *, port: int | None = None) -> Protocol | None:
    """The protocol a Service port declares, or None when it declares nothing usable
    (then the caller sniffs). ``appProtocol`` wins over the port name; either is read up
    to its first '-' (``http-web`` is HTTP), except ``grpc-web``. A well-known server-first
    ``port`` with nothing declared is TCP, as in Istio."""
    if app_protocol:
        name = app_protocol.strip().lower()
        if name in _KUBERNETES_APP_PROTOCOLS:
            return _KUBERNETES_APP_PROTOCOLS[name]
    else:
        name = port_name.strip().lower()
    name = "grpc-web" if name.startswith("grpc-web") else name.split("-", 1)[0]
    found = _DECLARED.get(name)
    if found is None and port in SERVER_FIRST_PORTS:
        return "tcp"
    return found


# --- sniffing ------------------------------------------------------------------------------

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# The methods llhttp (under httptools) accepts in a request: claiming HTTP/1 for any other
# token would only earn the client a 400 from the codec, where opaque TCP would have worked.
HTTP1_METHODS = frozenset(m.encode() for m in (
    "GET HEAD POST PUT DELETE CONNECT OPTIONS TRACE PATCH QUERY "
    "COPY LOCK MKCOL MOVE PROPFIND PROPPATCH SEARCH UNLOCK BIND REBIND UNBIND ACL "
    "REPORT MKACTIVITY CHECKOUT MERGE M-SEARCH NOTIFY SUBSCRIBE UNSUBSCRIBE PURGE "
    "MKCALENDAR LINK UNLINK SOURCE").split())
_METHOD_PREFIXES = frozenset(m[:i] for m in HTTP1_METHODS for i in range(1, len(m) + 1))

MAX_REQUEST_LINE = 8192  # beyond this without a decision, it is not HTTP we want to parse
_LONGEST_METHOD = max(len(m) for m in HTTP1_METHODS)
_TARGET = re.compile(rb"[\x21-\x7e]+")
# "HTTP/1.x\r\n" as the set of bytes allowed at each position, to judge a partial line.
_VERSION_LINE = tuple(b"01" if c == "x" else c.encode() for c in "HTTP/1.x\r\n")
_TLS_MAX_RECORD = 16384 + 2048  # TLSPlaintext length limit (RFC 8446 5.1), with TLS 1.2's slack


def classify(prefix: bytes) -> Protocol | None:
    """Classify the first bytes a client sent: "http2" (connection preface), "http1"
    (request line), "tls" (ClientHello record), "tcp" (anything else), or None while
    ``prefix`` is still too short to tell. Decides within MAX_REQUEST_LINE bytes."""
    if not prefix:
        return None
    if prefix[:len(H2_PREFACE)] == H2_PREFACE[:len(prefix)]:
        return "http2" if len(prefix) >= len(H2_PREFACE) else None
    if prefix[0] == 0x16:
        return _classify_tls(prefix)
    return _classify_request_line(prefix)


def _classify_tls(prefix: bytes) -> Protocol | None:
    # Record header: type 22 (handshake), version 3.0-3.4, a sane length; then the handshake
    # message type 1 (ClientHello). Six bytes settle it.
    if len(prefix) >= 2 and prefix[1] != 0x03:
        return "tcp"
    if len(prefix) >= 3 and prefix[2] > 0x04:
        return "tcp"
    if len(prefix) >= 5 and not 0 < int.from_bytes(prefix[3:5], "big") <= _TLS_MAX_RECORD:
        return "tcp"
    if len(prefix) >= 6:
        return "tls" if prefix[5] == 0x01 else "tcp"
    return None


def _classify_request_line(prefix: bytes) -> Protocol | None:
    """``METHOD SP target SP HTTP/1.x CRLF``, deciding "tcp" at the first byte that
    cannot belong to it."""
    space = prefix.find(b" ", 0, _LONGEST_METHOD + 1)
    if space < 0:
        return None if prefix in _METHOD_PREFIXES else "tcp"
    if prefix[:space] not in HTTP1_METHODS:
        return "tcp"
    start = space + 1
    # The target: visible ASCII only (llhttp refuses the rest), at least one byte.
    target = _TARGET.match(prefix, start)
    pos = target.end() if target else start
    if pos >= MAX_REQUEST_LINE:
        return "tcp"
    if pos == len(prefix):
        return None
    if prefix[pos] != 0x20 or pos == start:
        return "tcp"
    rest = prefix[pos + 1:pos + 1 + len(b"HTTP/1.1\r\n")]
    if any(have not in _VERSION_LINE[i] for i, have in enumerate(rest)):
        return "tcp"
    return "http1" if len(rest) == len(_VERSION_LINE) else None


class Sniffer:
    """Accumulates a new connection's first bytes until ``classify`` decides. The caller
    runs the sniff window: when it expires, ``timeout()`` settles on "tcp", so that a
    server-first protocol (SMTP, MySQL: the client says nothing) waits no longer than
    the window. ``buffered`` holds what was read, to replay into the chosen codec."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._decision: Protocol | None = None

    @property
    def decision(self) -> Protocol | None:
        return self._decision

    @property
    def buffered(self) -> bytes:
        return bytes(self._buf)

    def feed(self, data: bytes) -> Protocol | None:
        """Add bytes the client sent; the decision, or None to wait for more."""
        if self._decision is not None:
            raise RuntimeError(f"sniffer already decided {self._decision!r}: hand the bytes to its codec")
        self._buf += data
        self._decision = classify(bytes(self._buf[:MAX_REQUEST_LINE + 16]))
        if self._decision is None and len(self._buf) > MAX_REQUEST_LINE:
            self._decision = "tcp"  # defensive: classify decides well before this
        return self._decision

    def timeout(self) -> Protocol:
        """The sniff window expired (or the client half-closed): whatever is undecided
        is opaque TCP."""
        if self._decision is None:
            self._decision = "tcp"
        return self._decision
