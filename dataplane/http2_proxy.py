"""The HTTP/2 (h2c) and gRPC path of the node proxy: stream by stream.

Role: next to the HTTP/1.1 path (http1_proxy.py), it serves a downstream h2c
connection that OutboundProxy hands over. Each stream is one request: it is
routed (RDS), rate limited, balanced over the chosen cluster's backends (per
stream, not per connection, so one gRPC channel spreads over every endpoint)
and forwarded over a pooled, multiplexed upstream h2c connection opened from
the client pod's netns. Headers, body and trailers (``grpc-status``) pass both
ways unchanged; RST_STREAM is passed on both ways; GOAWAY is honoured on both
sides. Timeouts, retries (including gRPC status conditions of a trailers-only
reply), circuit breaking and outlier detection follow the HTTP/1.1 path. As there, a
route timeout covers the wait for the response head: a stream that has its head (a
long gRPC stream) runs as long as it runs.

Flow control is end to end: body bytes received on one side are credited back
to their sender (``H2Endpoint.acknowledge``) only once the other side's window
took them, so what the proxy holds per stream is bounded by the stream window
it advertised, and a slow reader throttles the writer on the far side. Beyond
that, a request body is kept only while it is small (``REPLAY_LIMIT``) so that
a retry can send it again.

The codec is sans-IO (protocols/http2.py); here is the asyncio side: one
Protocol per connection feeding bytes to its endpoint, and one task per stream
for the decisions that wait (connect, response head, retry back-off). Body
bytes move in the Protocol callbacks, without a task switch per frame.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import quote

from dataplane.backend import Backend
from dataplane.balancers import hash_key_for, parse_cookies
from dataplane.connect import connect_from_pod
from dataplane.http1_proxy import FLAGS_HEADER, REPLAY_LIMIT, RequestRecord
from dataplane.policy.circuit_breaker import Resource
from dataplane.policy.outlier import LocalOrigin
from dataplane.policy.retry import Failure, Outcome, RetryDecision, RetryPolicy
from dataplane.protocols.http2 import (
    Data,
    ErrorCodes,
    Event,
    GoAway,
    H2Endpoint,
    Header,
    Headers,
    ProtocolViolation,
    RequestHeaders,
    ResponseHeaders,
    StreamReset,
    Trailers,
    WindowOpened,
    grpc_status,
    is_grpc,
)
from dataplane.relay import HIGH_WATER, reset
from dataplane.routing import Route
from dataplane.services import ServiceEntry
from dataplane.upstreams import ClusterRuntime, Overflow, Upstreams

log = logging.getLogger("nodemesh.http2")

# Streams the proxy opens on one pooled upstream connection before it opens another. The
# peer's own limit applies too, but is unknown until its SETTINGS arrive (h2 assumes no
# limit until then); 100 is the lowest value RFC 9113 recommends a server to allow.
MAX_STREAMS_PER_UPSTREAM = 100
# A stream the upstream refused (REFUSED_STREAM, or above a GOAWAY's last stream id) was
# never processed: it goes again on a fresh connection this many times, retry policy or not.
REFUSED_RETRIES = 2

# gRPC status codes used here (https://grpc.io/docs/guides/status-codes/).
GRPC_CANCELLED = 1
GRPC_UNKNOWN = 2
GRPC_DEADLINE_EXCEEDED = 4
GRPC_PERMISSION_DENIED = 7
GRPC_RESOURCE_EXHAUSTED = 8
GRPC_UNIMPLEMENTED = 12
GRPC_INTERNAL = 13
GRPC_UNAVAILABLE = 14
GRPC_UNAUTHENTICATED = 16

# What a gRPC client makes of a local reply's HTTP status, as Envoy's local replies map it
# (Grpc::Utility::httpToGrpcStatus, after gRPC's http-grpc-status-mapping.md). A rate limit
# is 429 -> UNAVAILABLE, Envoy's default (rate_limited_as_resource_exhausted off).
_HTTP_TO_GRPC = {400: GRPC_INTERNAL, 401: GRPC_UNAUTHENTICATED, 403: GRPC_PERMISSION_DENIED,
                 404: GRPC_UNIMPLEMENTED, 429: GRPC_UNAVAILABLE, 502: GRPC_UNAVAILABLE,
                 503: GRPC_UNAVAILABLE, 504: GRPC_UNAVAILABLE}
# A gRPC status as an HTTP status, for outlier detection (Envoy's grpcToHttpStatus): an
# endpoint answering UNAVAILABLE in trailers counts as a 503 although its :status is 200.
_GRPC_TO_HTTP = {0: 200, 1: 499, 2: 500, 3: 400, 4: 504, 5: 404, 6: 409, 7: 403, 8: 429, 9: 400,
                 10: 409, 11: 400, 12: 501, 13: 500, 14: 503, 15: 500, 16: 401}
# The status a gRPC client reports for a stream reset with each HTTP/2 error code (gRPC's
# PROTOCOL-HTTP2.md); everything else is INTERNAL. Used for telemetry of reset streams.
_RESET_TO_GRPC = {ErrorCodes.CANCEL: GRPC_CANCELLED, ErrorCodes.REFUSED_STREAM: GRPC_UNAVAILABLE,
                  ErrorCodes.ENHANCE_YOUR_CALM: GRPC_RESOURCE_EXHAUSTED,
                  ErrorCodes.INADEQUATE_SECURITY: GRPC_PERMISSION_DENIED}

RequestHeadersHook = Callable[[list[tuple[bytes, bytes]]],
                              tuple[list[tuple[bytes, bytes]], str | None, str | None]]


def grpc_local_status(status: int, flag: str | None) -> int:
    """The grpc-status of a local reply that would carry HTTP ``status`` for plain HTTP.

    A timeout (flag UT) is DEADLINE_EXCEEDED, what the gRPC client's own deadline would
    give. Envoy's router says UNAVAILABLE there (its 504 goes through httpToGrpcStatus);
    only its max_stream_duration reply says DEADLINE_EXCEEDED. Everything else maps as in
    Envoy.
    """
    if flag == "UT":
        return GRPC_DEADLINE_EXCEEDED
    return _HTTP_TO_GRPC.get(status, GRPC_UNKNOWN)


class _Failed(Exception):
    """An attempt failed before a final response head arrived."""

    def __init__(self, failure: Failure, flag: str, status: int) -> None:
        super().__init__(flag)
        self.failure = failure
        self.flag = flag
        self.status = status


@dataclass(frozen=True)
class _Context:
    """The client pod and service a downstream connection belongs to."""

    pod_key: str
    pod_ip: str | None
    netns_fd: int
    entry: ServiceEntry


# -- connections ------------------------------------------------------------------------

class _Conn(asyncio.Protocol):
    """One h2c connection, either side: socket bytes to and from an H2Endpoint.

    Writes are coalesced: ``touch`` schedules one flush per loop iteration, so the
    many small frames a burst of events produces leave in one write. The transport's
    write buffer is watched (``writable``): while it is over its high-water mark the
    proxy forwards nothing more into this connection, even where the HTTP/2 windows
    would allow it, because a peer may advertise windows far larger than it reads.
    """

    def __init__(self, h2: H2Endpoint) -> None:
        self.h2 = h2
        self.transport: asyncio.Transport | None = None
        self.writable = True
        self.lost = False
        self.bytes_in = 0
        self.bytes_out = 0
        self._flush_scheduled = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=HIGH_WATER)
        self._write(self.h2.initiate())

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        self.on_events(self.h2.receive(data))
        self.flush()  # SETTINGS and PING acks, WINDOW_UPDATEs: at once

    def eof_received(self) -> bool:
        return False  # HTTP/2 has no half-close of the connection: close it

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.writable = False

    def pause_writing(self) -> None:
        self.writable = False

    def resume_writing(self) -> None:
        self.writable = True
        self.on_writable()

    # for the proxy

    def on_events(self, events: list[Event]) -> None:
        raise NotImplementedError

    def on_writable(self) -> None:
        raise NotImplementedError

    def touch(self) -> None:
        """Something was queued on the endpoint: write it out soon."""
        if not self._flush_scheduled and not self.lost:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        self._write(self.h2.data_to_send())

    def close(self) -> None:
        """GOAWAY, then close once it is written."""
        self.h2.close()
        self.flush()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _write(self, data: bytes) -> None:
        if data and self.transport is not None and not self.transport.is_closing():
            self.bytes_out += len(data)
            self.transport.write(data)


class _DownConn(_Conn):
    """The client's connection (server side of HTTP/2): one ``_Exchange`` per stream."""

    def __init__(self, proxy: Http2Proxy, ctx: _Context) -> None:
        super().__init__(H2Endpoint(client_side=False))
        self.proxy = proxy
        self.ctx = ctx
        self.exchanges: dict[int, _Exchange] = {}
        self.goaway = False  # the client said it opens no more streams
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_events(self, events: list[Event]) -> None:
        for ev in events:
            if isinstance(ev, RequestHeaders):
                self._open(ev)
            elif isinstance(ev, (Data, Trailers)):
                x = self.exchanges.get(ev.stream_id)
                if x is not None:
                    x.from_client(ev)
                elif isinstance(ev, Data):
                    # A stream already answered and forgotten: drop, but give the window back.
                    self.h2.acknowledge(ev.stream_id, ev.flow_controlled_length)
            elif isinstance(ev, StreamReset):
                x = self.exchanges.get(ev.stream_id)
                if x is not None:
                    self.proxy.stats["client_resets"] += 1
                    x.client_went_away("DR", ev.error_code)
            elif isinstance(ev, WindowOpened):
                for x in self._targets(ev.stream_id):
                    x.pump_response()
            elif isinstance(ev, GoAway):
                # Graceful on the client's part: the streams it opened still finish.
                self.goaway = True
                self.maybe_close()
            elif isinstance(ev, ProtocolViolation):
                log.info("%s: downstream HTTP/2 protocol error: %s", self.ctx.pod_key, ev.reason)
                for x in list(self.exchanges.values()):
                    x.client_went_away("DPE", ErrorCodes.CANCEL)
                self.close()

    def _targets(self, stream_id: int) -> list[_Exchange]:
        if stream_id == 0:
            return list(self.exchanges.values())
        x = self.exchanges.get(stream_id)
        return [x] if x is not None else []

    def on_writable(self) -> None:
        for x in list(self.exchanges.values()):
            x.pump_response()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        for x in list(self.exchanges.values()):
            x.client_went_away("DC", ErrorCodes.CANCEL)
        self.maybe_close()

    def _open(self, ev: RequestHeaders) -> None:
        if self.goaway or self.h2.closed:
            self.h2.reset(ev.stream_id, ErrorCodes.REFUSED_STREAM)
            return
        self.proxy.stats["streams"] += 1
        x = _Exchange(self, ev)
        self.exchanges[ev.stream_id] = x
        x.start()

    def finished(self, x: _Exchange) -> None:
        self.exchanges.pop(x.sid, None)
        self.maybe_close()

    def maybe_close(self) -> None:
        """Once the last stream is over: done if the socket is gone; close it if the
        client said GOAWAY or the connection failed."""
        if self.exchanges:
            return
        if self.lost:
            if not self.done.done():
                self.done.set_result(None)
        elif self.goaway or self.h2.closed:
            self.close()

    def abort(self) -> None:
        """The proxy is going away: fail every stream and drop the connection."""
        for x in list(self.exchanges.values()):
            x.client_went_away("DC", ErrorCodes.CANCEL)
        if self.transport is not None and not self.transport.is_closing():
            reset(self.transport)


class _UpConn(_Conn):
    """A pooled connection to one backend (client side of HTTP/2), multiplexed: streams
    of any client connection of the same pod share it."""

    def __init__(self, pool: _UpstreamPool, key: tuple[str, Backend]) -> None:
        super().__init__(H2Endpoint(client_side=True))
        self.pool = pool
        self.key = key
        self.streams: dict[int, _Exchange] = {}
        self.goaway = False
        self.runtime: ClusterRuntime | None = None  # whose circuit breaker counts it

    @property
    def has_room(self) -> bool:
        """Whether a new stream may go on this connection now."""
        return (not self.lost and not self.goaway and self.transport is not None
                and not self.transport.is_closing() and self.h2.can_open_stream
                and len(self.streams) < MAX_STREAMS_PER_UPSTREAM)

    def on_events(self, events: list[Event]) -> None:
        for ev in events:
            if isinstance(ev, (ResponseHeaders, Data, Trailers, StreamReset)):
                x = self.streams.get(ev.stream_id)
                a = x.attempt if x is not None else None
                if x is None or a is None or a.conn is not self or a.usid != ev.stream_id:
                    if isinstance(ev, Data):  # an abandoned attempt's: drop, keep the window
                        self.h2.acknowledge(ev.stream_id, ev.flow_controlled_length)
                    continue
                x.from_upstream(a, ev)
            elif isinstance(ev, WindowOpened):
                targets = list(self.streams.values()) if ev.stream_id == 0 else \
                    [x for x in (self.streams.get(ev.stream_id),) if x is not None]
                for x in targets:
                    x.pump_request()
            elif isinstance(ev, GoAway):
                # Streams above last_stream_id come as REFUSED_STREAM resets from the codec and
                # are retried elsewhere; the ones below it finish here. No new stream goes here.
                self.goaway = True
                self.pool.forget(self)
                log.info("upstream %s sent GOAWAY (last stream %d, error %d)",
                         self.key[1].address, ev.last_stream_id, ev.error_code)
            elif isinstance(ev, ProtocolViolation):
                log.info("upstream %s broke HTTP/2: %s", self.key[1].address, ev.reason)
                self._fail("UPE")
                self.close()
                return
        self.retire_if_idle()

    def on_writable(self) -> None:
        for x in list(self.streams.values()):
            x.pump_request()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._fail("UC")

    def _fail(self, flag: str) -> None:
        self.pool.forget(self)
        streams, self.streams = self.streams, {}
        for x in streams.values():
            if x.attempt is not None and x.attempt.conn is self:
                x.upstream_lost(x.attempt, flag)

    def retire_if_idle(self) -> None:
        """A connection that may carry no new stream closes when its last stream ends."""
        if not self.streams and (self.goaway or self.h2.closed) and not self.lost:
            self.pool.forget(self)
            self.close()


class _ConnectAbandoned(Exception):
    """The task that was opening a shared connection went away before it was open."""


class _UpstreamPool:
    """Multiplexed upstream connections per (client pod, backend).

    A new connection is opened only when none has a free stream slot (or the one there
    got GOAWAY); concurrent streams wait for a connection already being opened instead
    of each opening its own.
    """

    def __init__(self, proxy: Http2Proxy) -> None:
        self.proxy = proxy
        self.conns: dict[tuple[str, Backend], list[_UpConn]] = {}
        self._connecting: dict[tuple[str, Backend], asyncio.Future[_UpConn]] = {}

    async def acquire(self, pod_key: str, netns_fd: int, backend: Backend, timeout: float,
                      runtime: ClusterRuntime | None = None) -> _UpConn:
        """A connection with room for one more stream; raises OSError, TimeoutError, or
        Overflow when the cluster is at max_connections and max_pending_requests."""
        key = (pod_key, backend)
        while True:
            for conn in self.conns.get(key, ()):
                if conn.has_room:
                    return conn
            pending = self._connecting.get(key)
            if pending is not None:
                try:
                    await asyncio.shield(pending)
                except _ConnectAbandoned:
                    pass  # open one ourselves
                continue
            if runtime is None or runtime.breaker.try_acquire(Resource.CONNECTIONS):
                break
            # At max_connections: wait as a pending request (bounded by
            # max_pending_requests) for a stream slot or a connection to free up.
            if not runtime.breaker.try_acquire(Resource.PENDING_REQUESTS):
                raise Overflow("max_pending_requests")
            try:
                # A stream ending frees a slot without any event of ours: look
                # again every 50 ms (the caller's deadline bounds the wait).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(runtime.freed.wait(), 0.05)
            finally:
                runtime.breaker.release(Resource.PENDING_REQUESTS)
        fut: asyncio.Future[_UpConn] = asyncio.get_running_loop().create_future()
        self._connecting[key] = fut
        try:
            _, conn = await connect_from_pod(netns_fd, backend, timeout, lambda: _UpConn(self, key))
        except BaseException as exc:
            if runtime is not None:
                runtime.connection_closed()
            fut.set_exception(exc if isinstance(exc, Exception) else _ConnectAbandoned())
            fut.exception()  # retrieved: nobody may be waiting
            raise
        finally:
            self._connecting.pop(key, None)
        conn.runtime = runtime
        self.proxy.stats["upstream_connects"] += 1
        self.conns.setdefault(key, []).append(conn)
        fut.set_result(conn)
        return conn

    def forget(self, conn: _UpConn) -> None:
        runtime, conn.runtime = conn.runtime, None
        if runtime is not None:
            runtime.connection_closed()  # its circuit-breaker slot, once
        conns = self.conns.get(conn.key)
        if conns and conn in conns:
            conns.remove(conn)
            if not conns:
                del self.conns[conn.key]

    def open_connections(self) -> int:
        return sum(len(c) for c in self.conns.values())

    def close(self) -> None:
        for conns in list(self.conns.values()):
            for conn in list(conns):
                conn.close()
        self.conns.clear()


# -- streams ----------------------------------------------------------------------------

@dataclass(eq=False)
class _Attempt:
    """One try of a request on one upstream stream."""

    conn: _UpConn
    usid: int
    backend: Backend
    head: asyncio.Future[ResponseHeaders | _Failed]
    sent: int = 0  # request body bytes this attempt sent upstream
    request_done: bool = False  # END_STREAM (or trailers) went upstream
    reset_code: int | None = None  # the upstream reset the stream, or its connection died
    reset_flag: str = "UR"  # UR: reset by the upstream; UC, UPE: its connection died
    cancelled: bool = False  # the proxy reset the stream
    outlier_pending: bool = False  # a gRPC answer: outlier result when its grpc-status comes


@dataclass
class _Body:
    """Body bytes from one side not yet taken by the other side's window."""

    chunks: collections.deque[memoryview] = field(default_factory=collections.deque)
    size: int = 0

    def push(self, data: bytes) -> None:
        self.chunks.append(memoryview(data))
        self.size += len(data)

    def take(self, n: int) -> memoryview:
        """Remove the first ``n`` bytes (within the first chunk) and return them."""
        head = self.chunks[0]
        if n == len(head):
            self.chunks.popleft()
        else:
            self.chunks[0] = head[n:]
        self.size -= n
        return head[:n]

    def clear(self) -> int:
        n, self.size = self.size, 0
        self.chunks.clear()
        return n


class _Exchange:
    """One downstream stream: a request, its attempts upstream, and its response."""

    def __init__(self, down: _DownConn, head: RequestHeaders) -> None:
        self.down = down
        self.proxy = down.proxy
        self.sid = head.stream_id
        self.headers = head.headers
        self.hmap = _header_map(head.headers)
        self.grpc = is_grpc(head.headers)
        ctx = down.ctx
        self.rec = RequestRecord(pod=ctx.pod_key, pod_ip=ctx.pod_ip, service=ctx.entry.service,
                                 method=self.hmap.get(":method", ""), path=self.hmap.get(":path", ""),
                                 authority=self.hmap.get(":authority") or self.hmap.get("host", ""),
                                 protocol="HTTP/2")
        self.up_headers: Headers = head.headers
        # The request body: ``pending`` is not yet acknowledged to the client; ``replay`` is what
        # went upstream and was acknowledged, kept while it fits REPLAY_LIMIT so a retry can resend it.
        self.pending = _Body()
        self.received = 0
        self.acked = 0
        self.replay = bytearray()
        self.overflowed = False
        self.req_end = head.end_stream
        self.req_trailers: Headers | None = None
        # The response of the current attempt.
        self.attempt: _Attempt | None = None
        self.resp = _Body()
        self.resp_end = False
        self.resp_trailers: Headers | None = None
        self.resp_started = False  # its head went to the client: no retry from here on
        self.resp_done = False  # END_STREAM went to the client
        self.local = False  # answered by the proxy itself
        self.gone = False  # the client reset the stream or lost the connection
        self.aborted = False  # the proxy reset the client's stream
        self.abort_code = ErrorCodes.INTERNAL_ERROR  # with this code
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.task: asyncio.Task[None] | None = None

    @property
    def replayable(self) -> bool:
        return not self.overflowed

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            await self._handle()
        except asyncio.CancelledError:
            pass  # the client went away: nothing to answer, clean up below
        except Exception:
            log.exception("%s: HTTP/2 stream %d failed", self.down.ctx.pod_key, self.sid)
            self.rec.flags.append("UPE")
        finally:
            self._cleanup()
            if self.proxy.on_request is not None:
                try:
                    self.proxy.on_request(self.rec)
                except Exception:
                    log.exception("request telemetry hook failed")

    # -- the request's life -----------------------------------------------------------

    async def _handle(self) -> None:
        entry = self.down.ctx.entry
        rec = self.rec
        routes = entry.routes
        route: Route | None = routes.match(rec.path, self.hmap) if routes else None
        if route is None:
            await self._local(404, "NR", "no route")
            return
        rec.route = route.name
        now = time.monotonic()
        upstreams = self.proxy.upstreams
        if routes is not None and routes.rate_limit is not None and not upstreams.bucket(
                f"{entry.vip}:{entry.port}", routes.rate_limit, now).allow(now):
            await self._local(429, "RL", "local_rate_limited")
            return
        action = route.action
        if action.direct_status is not None:
            await self._local(action.direct_status, None, "")
            return
        runtime = upstreams.clusters.get(action.pick_cluster(upstreams.rng) or "")
        if runtime is None:
            await self._local(503, "NC", "no cluster")
            return
        rec.cluster = runtime.config.name
        pseudo = [h for h in self.headers if h[0].startswith(b":")]
        regular = [h for h in self.headers if not h[0].startswith(b":")]
        if self.proxy.request_headers is not None:
            regular, rec.request_id, rec.traceparent = self.proxy.request_headers(regular)
        self.up_headers = tuple(pseudo + list(regular))
        key = None
        if action.hash_policies:
            key = hash_key_for(list(action.hash_policies), self.hmap, parse_cookies(self.hmap), rec.pod_ip)
        deadline = now + action.timeout if action.timeout else None
        policy = action.retry
        tried: set[Backend] = set()
        attempt = 1
        while True:
            retrying = attempt > 1
            if retrying and not runtime.breaker.try_acquire(Resource.RETRIES):
                await self._local(503, "UO", "retry overflow")
                return
            try:
                if await self._attempt(runtime, key, tried, deadline, policy, attempt):
                    return
            finally:
                if retrying:
                    runtime.breaker.release(Resource.RETRIES)
            attempt += 1
            self.proxy.stats["retries"] += 1
            if policy is not None:
                await asyncio.sleep(policy.back_off.delay(attempt - 1, upstreams.rng))

    async def _attempt(self, runtime: ClusterRuntime, key: bytes | None, tried: set[Backend],
                       deadline: float | None, policy: RetryPolicy | None, attempt: int) -> bool:
        """Try number ``attempt`` (1 first). True when the exchange is over, answered by the
        upstream or by the proxy; False to try again."""
        rec = self.rec
        if not runtime.breaker.try_acquire(Resource.REQUESTS):
            await self._local(503, "UO", "upstream overflow")
            return True
        now = time.monotonic()
        # A retry prefers an endpoint not tried yet; with all tried, any will do (Envoy retries on
        # the same host unless a retry host predicate says otherwise).
        backend = runtime.pick(key, tried, now) or (runtime.pick(key, set(), now) if tried else None)
        if backend is None:
            runtime.breaker.release(Resource.REQUESTS)
            await self._local(503, "UH", "no healthy upstream")
            return True
        tried.add(backend)
        rec.upstream = backend.address
        rec.attempts += 1
        runtime.balancer.started(backend)
        try:
            try:
                a, head = await self._send(runtime, backend, _remaining(
                    deadline, policy.per_try_timeout if policy else None))
            except _Failed as f:
                return await self._failed(f, runtime, backend, deadline, policy, attempt)
            status = _status(head)
            trailers_only = head.end_stream
            grpc_code = grpc_status(head.headers) if self.grpc and trailers_only else None
            if runtime.outlier is not None:
                if grpc_code is not None:
                    runtime.outlier.record(backend, _GRPC_TO_HTTP.get(grpc_code, 500), time.monotonic())
                elif self.grpc and status == 200:
                    a.outlier_pending = True  # the verdict is in the trailers
                else:
                    runtime.outlier.record(backend, status, time.monotonic())
            if policy is not None and (status >= 400 or grpc_code not in (None, 0)):
                decision = policy.decide(attempt, Outcome.response(status, grpc_status=grpc_code),
                                         rec.method, body_replayable=self.replayable)
                if decision is RetryDecision.RETRY:
                    self._drop_attempt()
                    return False
                if decision is RetryDecision.RETRIES_EXHAUSTED:
                    rec.flags.append("URX")
            self._respond(head, grpc_code)
            await self.finished
            return True
        finally:
            runtime.balancer.finished(backend)
            runtime.breaker.release(Resource.REQUESTS)

    async def _failed(self, f: _Failed, runtime: ClusterRuntime, backend: Backend,
                      deadline: float | None, policy: RetryPolicy | None, attempt: int) -> bool:
        """An attempt without a response: retry it, or answer the client."""
        self._drop_attempt()
        if runtime.outlier is not None and f.failure is not Failure.OVERFLOW:
            origin = LocalOrigin.TIMEOUT if f.failure is Failure.PER_TRY_TIMEOUT else \
                LocalOrigin.CONNECT_FAILED if f.failure is Failure.CONNECT_FAILURE else LocalOrigin.RESET
            runtime.outlier.record(backend, origin, time.monotonic())
        overall = deadline is not None and time.monotonic() >= deadline
        if policy is not None and not overall:
            decision = policy.decide(attempt, Outcome.failed(f.failure), self.rec.method,
                                     body_replayable=self.replayable)
            if decision is RetryDecision.RETRY:
                return False
            if decision is RetryDecision.RETRIES_EXHAUSTED:
                self.rec.flags.append("URX")
        flag = "UT" if overall or f.failure is Failure.PER_TRY_TIMEOUT else f.flag
        status = 504 if flag == "UT" else f.status
        await self._local(status, flag, "upstream request timeout" if flag == "UT" else
                          "upstream connect error or disconnect/reset before headers")
        return True

    async def _send(self, runtime: ClusterRuntime, backend: Backend,
                    limit: float | None) -> tuple[_Attempt, ResponseHeaders]:
        """Open a stream to ``backend``, send the request, return the final response head."""
        ctx = self.down.ctx
        until = None if limit is None else time.monotonic() + limit
        for _ in range(REFUSED_RETRIES + 1):
            try:
                conn = await asyncio.wait_for(
                    self.proxy.pool.acquire(ctx.pod_key, ctx.netns_fd, backend, self.proxy.connect_timeout,
                                            runtime),
                    _remaining(until, None))
            except Overflow:
                raise _Failed(Failure.OVERFLOW, "UO", 503) from None
            except TimeoutError:
                if until is not None and time.monotonic() >= until:
                    raise _Failed(Failure.PER_TRY_TIMEOUT, "UT", 504) from None
                raise _Failed(Failure.CONNECT_FAILURE, "UF", 503) from None
            except OSError:
                raise _Failed(Failure.CONNECT_FAILURE, "UF", 503) from None
            a = self._open_attempt(conn, backend)
            try:
                got = await asyncio.wait_for(asyncio.shield(a.head), _remaining(until, None))
            except TimeoutError:
                raise _Failed(Failure.PER_TRY_TIMEOUT, "UT", 504) from None
            if isinstance(got, ResponseHeaders):
                return a, got
            if got.failure is Failure.REFUSED_STREAM and self.replayable:
                # Never processed upstream (RFC 9113 §8.7): safe to send again, on a new connection.
                self._drop_attempt()
                self.proxy.stats["refused_retries"] += 1
                continue
            raise got
        raise _Failed(Failure.REFUSED_STREAM, "UR", 503)

    def _open_attempt(self, conn: _UpConn, backend: Backend) -> _Attempt:
        usid = conn.h2.new_stream_id()  # has_room held: no await since acquire
        a = _Attempt(conn, usid, backend, asyncio.get_running_loop().create_future())
        conn.streams[usid] = self
        self.attempt = a
        self.resp.clear()
        self.resp_end = False
        self.resp_trailers = None
        headers_only = self.req_end and self.received == 0 and self.req_trailers is None
        conn.h2.send_headers(usid, self.up_headers, end_stream=headers_only)
        a.request_done = headers_only
        conn.touch()
        self.pump_request()
        return a

    def _drop_attempt(self) -> None:
        """Let go of the current attempt's upstream stream, resetting it if still open."""
        a, self.attempt = self.attempt, None
        if a is None:
            return
        a.conn.streams.pop(a.usid, None)
        if not a.conn.lost:
            # Response bytes the client will not get: credit them back, or the pooled
            # connection's window would shrink for good.
            a.conn.h2.acknowledge(a.usid, self.resp.clear())
            if a.reset_code is None and not a.cancelled and not (a.request_done and self.resp_end):
                a.cancelled = True
                a.conn.h2.reset(a.usid, ErrorCodes.CANCEL)
            a.conn.touch()
            a.conn.retire_if_idle()
        self.resp.clear()

    async def _local(self, status: int, flag: str | None, message: str) -> None:
        """Answer the client from the proxy (Envoy's local reply), then wait until it is out.

        gRPC gets a trailers-only answer, HTTP 200 with the grpc-status, so that the client
        reports a status instead of a transport error.
        """
        rec = self.rec
        self.proxy.stats["local_replies"] += 1
        self.local = True
        if flag:
            rec.flags.append(flag)
        extra = [(FLAGS_HEADER, flag.encode())] if flag else []
        self.resp.clear()
        if self.grpc:
            code = grpc_local_status(status, flag)
            rec.status, rec.grpc_status = 200, str(code)
            headers = [(b":status", b"200"), (b"content-type", b"application/grpc"),
                       (b"grpc-status", str(code).encode()),
                       (b"grpc-message", _grpc_message(message or str(status))), *extra]
            self.down.h2.send_headers(self.sid, headers, end_stream=True)
            self.resp_started = self.resp_end = self.resp_done = True
        else:
            body = f"{flag or status}\n".encode()
            rec.status = status
            headers = [(b":status", str(status).encode()), (b"content-type", b"text/plain"),
                       (b"content-length", str(len(body)).encode()), *extra]
            self.down.h2.send_headers(self.sid, headers)
            self.resp_started = self.resp_end = True
            self.resp.push(body)  # through the flow-control path: the client's window may be shut
            self.pump_response()
        self.down.touch()
        self._check_finished()
        await self.finished

    def _respond(self, head: ResponseHeaders, grpc_code: int | None) -> None:
        """Pass the upstream's final response head on; the body follows as it comes."""
        self.rec.status = _status(head)
        if grpc_code is not None:
            self.rec.grpc_status = str(grpc_code)
        self.resp_started = True
        # No retry from here on: the replay copy can go (a long stream would hold it for nothing).
        self.overflowed = True
        self.replay = bytearray()
        self.down.h2.send_headers(self.sid, head.headers, end_stream=head.end_stream)
        if head.end_stream:
            self.resp_end = self.resp_done = True
        self.down.touch()
        a = self.attempt
        if a is not None and a.reset_code is not None and not self.resp_end:
            # The stream died while the head was on its way to the task. As Envoy, no retry once
            # a head came; the client gets the head and then the reset, as the upstream sent them.
            self.rec.flags.append(a.reset_flag)
            self._abort(a.reset_code)
            return
        self.pump_response()
        self._check_finished()

    # -- events ---------------------------------------------------------------------------

    def from_client(self, ev: Data | Trailers) -> None:
        """Request body or trailers from the client."""
        if isinstance(ev, Trailers):
            self.req_trailers = ev.headers
            self.req_end = True
            self.pump_request()
            return
        self.rec.request_bytes += len(ev.data)
        if self.local or self.finished.done():
            # Answered already: nowhere to send it; credit it back so the client is not stuck.
            self.down.h2.acknowledge(self.sid, ev.flow_controlled_length)
            self.down.touch()
            return
        padding = ev.flow_controlled_length - len(ev.data)
        if padding:
            self.down.h2.acknowledge(self.sid, padding)  # padding is not forwarded: consumed now
        if ev.data:
            self.pending.push(ev.data)
            self.received += len(ev.data)
        if ev.end_stream:
            self.req_end = True
        self.pump_request()

    def from_upstream(self, a: _Attempt, ev: Event) -> None:
        """Something for the current attempt's upstream stream."""
        if isinstance(ev, ResponseHeaders):
            if 100 <= _status(ev) < 200:
                if not self.resp_started:  # 100-continue and friends: the final head follows
                    self.down.h2.send_headers(self.sid, ev.headers)
                    self.down.touch()
                return
            if not a.head.done():
                a.head.set_result(ev)
            self.resp_end = ev.end_stream
        elif isinstance(ev, Data):
            padding = ev.flow_controlled_length - len(ev.data)
            if padding:
                a.conn.h2.acknowledge(a.usid, padding)
            if ev.data:
                self.resp.push(ev.data)
            if ev.end_stream:
                self.resp_end = True
            self.pump_response()
        elif isinstance(ev, Trailers):
            self.resp_trailers = ev.headers
            self.resp_end = True
            self._grpc_verdict(a, ev.headers)
            self.pump_response()
        elif isinstance(ev, StreamReset):
            self._upstream_reset(a, ev.error_code)
        self._check_finished()

    def _grpc_verdict(self, a: _Attempt, trailers: Headers) -> None:
        if not self.grpc:
            return
        code = grpc_status(trailers)
        if code is None:
            return
        self.rec.grpc_status = str(code)
        runtime = self.proxy.upstreams.clusters.get(self.rec.cluster or "")
        if a.outlier_pending and runtime is not None and runtime.outlier is not None:
            runtime.outlier.record(a.backend, _GRPC_TO_HTTP.get(code, 500), time.monotonic())
        a.outlier_pending = False

    def _upstream_reset(self, a: _Attempt, code: int) -> None:
        self.proxy.stats["upstream_resets"] += 1
        a.reset_code = code
        if not a.head.done():
            failure = Failure.REFUSED_STREAM if code == ErrorCodes.REFUSED_STREAM else Failure.RESET
            a.head.set_result(_Failed(failure, "UR", 503))
            return
        if not self.resp_started:
            return  # the task has the head in hand and sees reset_code
        if self.resp_end:
            # The response is whole and the server wants no more of the request (RST_STREAM
            # NO_ERROR, RFC 9113 §8.1): deliver the response, then tell the client the same.
            self._drop_request_body()
            return
        self.rec.flags.append("UR")
        self._abort(code)

    def upstream_lost(self, a: _Attempt, flag: str) -> None:
        """The attempt's upstream connection died or broke the protocol."""
        if a is not self.attempt:
            return
        a.reset_code = ErrorCodes.INTERNAL_ERROR
        a.reset_flag = flag
        if not a.head.done():
            a.head.set_result(_Failed(Failure.RESET, flag, 503))
        elif self.resp_started:
            if self.resp_end:
                self._drop_request_body()  # the answer is whole: deliver it, stop the request
                self._check_finished()
            else:
                self.rec.flags.append(flag)
                self._abort(ErrorCodes.INTERNAL_ERROR)

    def client_went_away(self, flag: str, code: int) -> None:
        """The client reset the stream (``code``) or its connection is gone: cancel upstream."""
        if self.gone:
            return
        self.gone = True
        if not self.finished.done():
            self.rec.flags.append(flag)
        a = self.attempt
        if a is not None and not a.conn.lost and a.reset_code is None and not a.cancelled:
            a.cancelled = True
            a.conn.h2.reset(a.usid, code)  # the same code: a gRPC server sees CANCELLED
            a.conn.touch()
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def _abort(self, code: int) -> None:
        """Reset the client's stream mid-response (the upstream failed it)."""
        self.aborted = True
        self.abort_code = code
        if not self.down.lost:
            self.down.h2.reset(self.sid, code)
            self.down.touch()
        self._finish()

    # -- moving body bytes ----------------------------------------------------------------

    def pump_request(self) -> None:
        """Forward request body bytes upstream as far as the upstream window allows."""
        a = self.attempt
        if a is None or a.request_done or a.conn.lost or not a.conn.writable or a.reset_code is not None:
            return
        h2 = a.conn.h2
        while True:
            chunk: bytes | memoryview
            if a.sent < self.acked:
                assert not self.overflowed  # a retry starts only with the whole body kept
                chunk = bytes(self.replay[a.sent:self.acked])
            elif self.pending.chunks:
                chunk = self.pending.chunks[0]
            else:
                break
            last = self.req_end and self.req_trailers is None and a.sent + len(chunk) == self.received
            n = h2.send_data(a.usid, chunk, end_stream=last)
            if n:
                self._advance(a, n)
            if n < len(chunk):
                break  # the window is shut: more on WindowOpened
            if last:
                a.request_done = True
                break
        if not a.request_done and self.req_end and a.sent == self.received:
            if self.req_trailers is not None:
                h2.send_trailers(a.usid, self.req_trailers)
            else:
                h2.send_data(a.usid, b"", end_stream=True)
            a.request_done = True
        a.conn.touch()
        if a.request_done:
            self._check_finished()

    def _advance(self, a: _Attempt, n: int) -> None:
        """``n`` more request bytes went upstream on attempt ``a``."""
        a.sent += n
        fresh = a.sent - self.acked
        if fresh <= 0:
            return  # replayed bytes, acknowledged to the client long ago
        taken = self.pending.take(fresh)
        self.acked = a.sent
        if not self.overflowed:
            if self.acked <= REPLAY_LIMIT:
                self.replay += taken
            else:
                self.overflowed = True
                self.replay = bytearray()
        self.down.h2.acknowledge(self.sid, fresh)
        self.down.touch()

    def pump_response(self) -> None:
        """Forward response body bytes to the client as far as its window allows."""
        if not self.resp_started or self.resp_done or self.aborted or self.down.lost \
                or not self.down.writable:
            return
        a = self.attempt
        h2 = self.down.h2
        while self.resp.chunks:
            chunk = self.resp.chunks[0]
            last = self.resp_end and self.resp_trailers is None and len(self.resp.chunks) == 1
            n = h2.send_data(self.sid, chunk, end_stream=last)
            if n:
                self.resp.take(n)
                self.rec.response_bytes += n
                if a is not None and not a.conn.lost:
                    a.conn.h2.acknowledge(a.usid, n)
                    a.conn.touch()
            if n < len(chunk):
                break
            if last:
                self.resp_done = True
        if self.resp_end and not self.resp.chunks and not self.resp_done:
            if self.resp_trailers is not None:
                h2.send_trailers(self.sid, self.resp_trailers)
            else:
                h2.send_data(self.sid, b"", end_stream=True)
            self.resp_done = True
        self.down.touch()
        if self.resp_done:
            self._check_finished()

    def _drop_request_body(self) -> None:
        """Stop forwarding the request: credit back what is held."""
        n = self.pending.clear()
        if n and not self.down.lost:
            self.down.h2.acknowledge(self.sid, n)
            self.down.touch()

    # -- the end ----------------------------------------------------------------------------

    def _check_finished(self) -> None:
        if self.finished.done() or not self.resp_done:
            return
        a = self.attempt
        if a is not None and not self.local and not a.request_done and a.reset_code is None:
            return  # the client still streams and the server still reads (bidirectional)
        if not self.req_end and not self.down.lost:
            # Answered before the request ended: the client may stop sending (RFC 9113 §8.1).
            self.down.h2.reset(self.sid, ErrorCodes.NO_ERROR)
            self.down.touch()
        self._finish()

    def _finish(self) -> None:
        if not self.finished.done():
            self.finished.set_result(None)

    def _cleanup(self) -> None:
        self._drop_attempt()
        self._drop_request_body()
        if not self.gone and not self.down.lost and not self.aborted and not self.resp_done:
            self.down.h2.reset(self.sid, ErrorCodes.INTERNAL_ERROR)  # no whole answer to give
            self.aborted = True
            self.down.touch()
        if self.grpc and self.rec.grpc_status is None and (self.gone or self.aborted):
            # What the gRPC client reports for the reset it got (or sent, when it cancelled).
            code = ErrorCodes.CANCEL if self.gone else self.abort_code
            self.rec.grpc_status = str(_RESET_TO_GRPC.get(code, GRPC_INTERNAL))
        if self.gone and not self.resp_started:
            self.rec.status = 0  # nothing reached the client
        self._finish()
        self.down.finished(self)


class Http2Proxy:
    """Serves h2c (and so gRPC) connections that OutboundProxy hands over, stream by stream.

    ``upstreams`` is shared with the HTTP/1.1 path: cluster runtimes (balancer, circuit
    breaker, outlier detector) and rate-limit buckets are per cluster, whatever the protocol.
    ``on_request`` gets one RequestRecord per stream once it is over; ``request_headers``
    may rewrite a request's headers (x-request-id, traceparent), as for HTTP/1.1.
    """

    def __init__(self, upstreams: Upstreams, connect_timeout: float,
                 on_request: Callable[[RequestRecord], None] | None = None,
                 request_headers: RequestHeadersHook | None = None) -> None:
        self.upstreams = upstreams
        self.connect_timeout = connect_timeout
        self.on_request = on_request
        self.request_headers = request_headers
        self.pool = _UpstreamPool(self)
        self._downstreams: set[_DownConn] = set()
        self.stats = {"connections": 0, "streams": 0, "local_replies": 0, "retries": 0,
                      "refused_retries": 0, "upstream_connects": 0, "client_resets": 0,
                      "upstream_resets": 0}

    async def serve(self, pod_key: str, pod_ip: str | None, netns_fd: int, entry: ServiceEntry,
                    transport: asyncio.BaseTransport, initial: bytes) -> tuple[int, int]:
        """Serve one downstream connection until it closes; ``initial`` is what was read from it
        already (while sniffing). Returns the bytes received from and sent to the client."""
        self.stats["connections"] += 1
        down = _DownConn(self, _Context(pod_key, pod_ip, netns_fd, entry))
        if transport.is_closing():
            return len(initial), 0
        self._downstreams.add(down)
        try:
            transport.set_protocol(down)
            down.connection_made(transport)
            if initial:
                down.data_received(initial)
            cast(asyncio.Transport, transport).resume_reading()  # paused while nobody read it
            await down.done
        finally:
            self._downstreams.discard(down)
            if not down.done.done():  # cancelled: the agent is stopping
                down.abort()
        return down.bytes_in, down.bytes_out

    def buffered(self) -> int:
        """Body bytes held now, both ways, waiting for the receiving side's window: bounded by
        the windows the proxy advertises, whatever the peers do."""
        return sum(x.pending.size + x.resp.size for down in self._downstreams
                   for x in down.exchanges.values())

    def open_upstream_connections(self) -> int:
        """Pooled upstream connections open now."""
        return self.pool.open_connections()

    def close(self) -> None:
        """Close the pooled upstream connections (GOAWAY first)."""
        self.pool.close()


# -- helpers --------------------------------------------------------------------------------

def _status(head: ResponseHeaders) -> int:
    for name, value in head.headers:
        if name == b":status":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0  # h2 refuses a response without :status; not reached


def _header_map(headers: Iterable[Header]) -> dict[str, str]:
    """Route-matching view: first value per lower-case name, pseudo-headers included, and
    ``host`` from ``:authority`` (HTTP/2's Host) unless the request also sent a host."""
    out: dict[str, str] = {}
    for name, value in headers:
        out.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    if ":authority" in out:
        out.setdefault("host", out[":authority"])
    return out


def _grpc_message(text: str) -> bytes:
    """grpc-message is percent-encoded (gRPC's PROTOCOL-HTTP2.md): printable ASCII but % stays."""
    return quote(text, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode("ascii")


def _remaining(deadline: float | None, per_try: float | None) -> float | None:
    left = None if deadline is None else max(0.0, deadline - time.monotonic())
    if per_try is not None:
        left = per_try if left is None else min(left, per_try)
    return left
