"""The HTTP/1.1 path of the node proxy: request by request.

Each request on a downstream connection is routed (RDS), rate limited,
balanced over the chosen cluster's backends (per request, not per
connection), sent over a pooled keep-alive connection made from the client
pod's netns, and retried or timed out as the route says; the response
streams back in order (pipelined requests are answered in order because
they are handled one at a time). Bodies stream both ways: the proxy keeps
at most a small replay buffer of a request body, for retries.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from dataplane.backend import Backend
from dataplane.balancers import hash_key_for, parse_cookies
from dataplane.channel import ChannelClosed, EventChannel
from dataplane.policy.circuit_breaker import Resource
from dataplane.policy.outlier import LocalOrigin
from dataplane.policy.retry import Failure, Outcome, RetryDecision, RetryPolicy
from dataplane.protocols.http1 import (
    Body,
    EndOfMessage,
    ProtocolError,
    RequestHead,
    RequestParser,
    ResponseHead,
    Upgraded,
    serialize_chunk,
    serialize_last_chunk,
    serialize_request_head,
    serialize_response_head,
    simple_response,
)
from dataplane.routing import Route
from dataplane.services import ServiceEntry
from dataplane.upstreams import ClusterRuntime, Overflow, Upstream, Upstreams

log = logging.getLogger("nodemesh.http")

REPLAY_LIMIT = 64 * 1024  # request body kept for a retry; beyond it a request is not retried
FLUSH_BYTES = 256 * 1024  # a response's pieces held back for one send at most
FLAGS_HEADER = b"x-nodemesh-response-flags"


@dataclass
class RequestRecord:
    """What telemetry needs of one request (Envoy's access-log fields)."""

    pod: str
    pod_ip: str | None
    service: str
    method: str
    path: str
    authority: str
    started: float = field(default_factory=time.monotonic)
    started_wall: float = field(default_factory=time.time)
    status: int = 0
    flags: list[str] = field(default_factory=list)
    upstream: str | None = None
    cluster: str | None = None
    route: str | None = None
    attempts: int = 0
    request_bytes: int = 0
    response_bytes: int = 0
    request_id: str | None = None
    traceparent: str | None = None
    # The gRPC status the client got: set for every gRPC request (from the trailers, a local
    # reply, or a stream reset), None for plain HTTP.
    grpc_status: str | None = None
    protocol: str = "HTTP/1.1"  # the downstream wire protocol, for the access log

    @property
    def response_flags(self) -> str:
        return ",".join(self.flags) or "-"


class _Failed(Exception):
    """An attempt failed before a response head arrived."""

    def __init__(self, failure: Failure, flag: str, status: int) -> None:
        super().__init__(flag)
        self.failure = failure
        self.flag = flag
        self.status = status


class RequestBody:
    """The request body, pulled from the client as it is forwarded; a copy is
    kept while it is small so that a retry can send it again."""

    def __init__(self, down: EventChannel, head: RequestHead) -> None:
        self.down = down
        self.framing = head.framing
        self.kept: list[bytes] = []
        self.kept_size = 0
        self.complete = head.framing == "none"
        self.trailers: tuple[tuple[bytes, bytes], ...] = ()
        self.overflowed = False
        self.size = 0

    @property
    def replayable(self) -> bool:
        return not self.overflowed

    async def send(self, up: EventChannel) -> None:
        chunked = self.framing == "chunked"
        for piece in self.kept:
            up.write(serialize_chunk(piece) if chunked else piece)
        while not self.complete:
            ev = await self.down.next_event()
            if ev is None:
                raise ConnectionResetError("the client went away mid-body")
            if isinstance(ev, ProtocolError):
                raise ValueError(ev.reason)
            if isinstance(ev, EndOfMessage):
                self.complete = True
                self.trailers = ev.trailers
                break
            assert isinstance(ev, Body)
            self.size += len(ev.data)
            if not self.overflowed:
                if self.kept_size + len(ev.data) <= REPLAY_LIMIT:
                    self.kept.append(ev.data)
                    self.kept_size += len(ev.data)
                else:
                    self.overflowed = True
                    self.kept.clear()
            up.write(serialize_chunk(ev.data) if chunked else ev.data)
            await up.drain()
        if chunked:
            up.write(serialize_last_chunk(self.trailers))
        await up.drain()


def _header_map(head: RequestHead) -> dict[str, str]:
    out: dict[str, str] = {}
    for n, v in head.headers:
        out.setdefault(n.decode("latin-1"), v.decode("latin-1"))
    out[":method"] = head.method.decode("latin-1")
    out[":path"] = head.target.decode("latin-1")
    return out


class Http1Proxy:
    def __init__(self, upstreams: Upstreams, connect_timeout: float,
                 on_request: Callable[[RequestRecord], None] | None = None,
                 request_headers: Callable[[list[tuple[bytes, bytes]]],
                                           tuple[list[tuple[bytes, bytes]], str | None,
                                                 str | None]] | None = None) -> None:
        self.upstreams = upstreams
        self.connect_timeout = connect_timeout
        self.on_request = on_request
        # Adds x-request-id / handles traceparent; returns (headers, request_id, traceparent).
        self.request_headers = request_headers
        self.stats = {"requests": 0, "local_replies": 0, "retries": 0, "upstream_connects": 0}

    async def serve(self, pod_key: str, pod_ip: str | None, netns_fd: int, entry: ServiceEntry,
                    down: EventChannel) -> None:
        """Serve one downstream connection until it closes or must be closed."""
        try:
            while True:
                ev = await down.next_event()
                if ev is None:
                    break
                if isinstance(ev, ProtocolError):
                    self._local(down, None, ev.status, "DPE", close=True)
                    break
                if not isinstance(ev, RequestHead):
                    continue  # stray body of a request we already answered
                keep = await self._request(pod_key, pod_ip, netns_fd, entry, down, ev)
                if not keep:
                    break
        except ChannelClosed:
            pass
        finally:
            down.close()

    def _local(self, down: EventChannel, rec: RequestRecord | None, status: int, flag: str | None,
               close: bool = False) -> None:
        self.stats["local_replies"] += 1
        headers = [(FLAGS_HEADER, flag.encode())] if flag else []
        body = f"{flag or status}\n".encode()
        if rec is not None:
            rec.status = status
            if flag:
                rec.flags.append(flag)
            rec.response_bytes += len(body)
        try:
            down.write(simple_response(status, body=body, headers=headers, close=close))
        except ChannelClosed:
            pass

    async def _request(self, pod_key: str, pod_ip: str | None, netns_fd: int, entry: ServiceEntry,
                       down: EventChannel, head: RequestHead) -> bool:
        """Handle one request; whether the connection may carry another."""
        self.stats["requests"] += 1
        hmap = _header_map(head)
        rec = RequestRecord(pod=pod_key, pod_ip=pod_ip, service=entry.service,
                            method=hmap[":method"], path=hmap[":path"],
                            authority=hmap.get("host", ""))
        keep = head.keep_alive and not head.upgrade
        try:
            return await self._handle(pod_key, netns_fd, entry, down, head, hmap, rec) and keep
        finally:
            if self.on_request is not None:
                self.on_request(rec)

    async def _handle(self, pod_key: str, netns_fd: int, entry: ServiceEntry, down: EventChannel,
                      head: RequestHead, hmap: dict[str, str], rec: RequestRecord) -> bool:
        routes = entry.routes
        route: Route | None = routes.match(rec.path, hmap) if routes else None
        body = RequestBody(down, head)
        if route is None:
            self._local(down, rec, 404, "NR")
            return await _discard(body)
        rec.route = route.name
        now = time.monotonic()
        if routes is not None and routes.rate_limit is not None and not self.upstreams.bucket(
                f"{entry.vip}:{entry.port}", routes.rate_limit, now).allow(now):
            self._local(down, rec, 429, "RL")
            return await _discard(body)
        action = route.action
        if action.direct_status is not None:
            self._local(down, rec, action.direct_status, None)
            return await _discard(body)
        cluster_name = action.pick_cluster(self.upstreams.rng)
        runtime = self.upstreams.clusters.get(cluster_name or "")
        if runtime is None:
            self._local(down, rec, 503, "NC")
            return await _discard(body)
        rec.cluster = runtime.config.name
        headers = list(head.headers)
        if self.request_headers is not None:
            headers, rec.request_id, rec.traceparent = self.request_headers(headers)
        key = None
        if action.hash_policies:
            key = hash_key_for(list(action.hash_policies), hmap, parse_cookies(hmap), rec.pod_ip)
        deadline = now + action.timeout if action.timeout else None
        retry = action.retry
        tried: set[Backend] = set()
        attempt = 0
        retrying = False
        while True:
            if retrying and not runtime.breaker.try_acquire(Resource.RETRIES):
                self._local(down, rec, 503, "UO")
                return await _discard(body)
            try:
                ok, keep = await self._attempt(pod_key, netns_fd, runtime, down, head, headers,
                                               body, key, tried, deadline, retry, attempt, rec)
            finally:
                if retrying:
                    runtime.breaker.release(Resource.RETRIES)
            if ok:
                return keep
            attempt += 1
            retrying = True
            self.stats["retries"] += 1
            if retry is not None:
                await asyncio.sleep(retry.back_off.delay(attempt, self.upstreams.rng))

    async def _attempt(self, pod_key: str, netns_fd: int, runtime: ClusterRuntime,
                       down: EventChannel, head: RequestHead, headers: list[tuple[bytes, bytes]],
                       body: RequestBody, key: bytes | None, tried: set[Backend],
                       deadline: float | None, policy: RetryPolicy | None, attempt: int,
                       rec: RequestRecord) -> tuple[bool, bool]:
        """One try. (True, keep-alive) when the exchange is over, successfully or
        with an answer sent to the client; (False, _) to try again."""
        now = time.monotonic()
        if not runtime.breaker.try_acquire(Resource.REQUESTS):
            self._local(down, rec, 503, "UO")
            return True, await _discard(body)
        backend = runtime.pick(key, tried, now)
        if backend is None:
            runtime.breaker.release(Resource.REQUESTS)
            self._local(down, rec, 503, "UH")
            return True, await _discard(body)
        tried.add(backend)
        rec.upstream = backend.address
        rec.attempts += 1
        runtime.balancer.started(backend)
        up: Upstream | None = None
        try:
            try:
                limit = _remaining(deadline, policy.per_try_timeout if policy else None)
                resp, up = await self._exchange(pod_key, netns_fd, runtime, backend, head, headers, body,
                                                limit)
            except _Failed as f:
                if runtime.outlier is not None and f.failure is not Failure.OVERFLOW:
                    origin = LocalOrigin.TIMEOUT if f.failure is Failure.PER_TRY_TIMEOUT else \
                        LocalOrigin.CONNECT_FAILED if f.failure is Failure.CONNECT_FAILURE else \
                        LocalOrigin.RESET
                    runtime.outlier.record(backend, origin, time.monotonic())
                overall = deadline is not None and time.monotonic() >= deadline
                # decide() counts tries from 1; ``attempt`` counts retries from 0.
                decision = policy.decide(attempt + 1, Outcome.failed(f.failure), rec.method,
                                         body_replayable=body.replayable) if policy else None
                if not overall and decision is RetryDecision.RETRY:
                    return False, False
                if decision is RetryDecision.RETRIES_EXHAUSTED:
                    rec.flags.append("URX")
                flag = "UT" if overall or f.failure is Failure.PER_TRY_TIMEOUT else f.flag
                status = 504 if flag == "UT" else f.status
                self._local(down, rec, status, flag)
                return True, False
            if runtime.outlier is not None:
                runtime.outlier.record(backend, resp.status, time.monotonic())
            if policy is not None and resp.status >= 400:
                decision = policy.decide(attempt + 1, Outcome.response(resp.status), rec.method,
                                         body_replayable=body.replayable)
                if decision is RetryDecision.RETRY:
                    assert up is not None
                    up.channel.close()  # the body we will not read: not reusable
                    up = None
                    return False, False
                if decision is RetryDecision.RETRIES_EXHAUSTED:
                    rec.flags.append("URX")
            keep = await self._respond(down, head, resp, up, rec)
            reusable = up is not None and resp.keep_alive and up.parser.idle and not head.upgrade
            if up is not None:
                self.upstreams.release(pod_key, up, reusable)
                up = None
            return True, keep
        finally:
            runtime.balancer.finished(backend)
            runtime.breaker.release(Resource.REQUESTS)
            if up is not None:
                up.channel.close()

    async def _exchange(self, pod_key: str, netns_fd: int, runtime: ClusterRuntime,
                        backend: Backend, head: RequestHead,
                        headers: list[tuple[bytes, bytes]], body: RequestBody,
                        limit: float | None) -> tuple[ResponseHead, Upstream]:
        """Send the request, return the final response head (1xx are skipped)."""
        loop_deadline = None if limit is None else time.monotonic() + limit
        for fresh in (False, True):
            try:
                up, reused = await asyncio.wait_for(
                    self.upstreams.acquire(pod_key, netns_fd, backend, self.connect_timeout,
                                           runtime),
                    _remaining(loop_deadline, None))
            except Overflow:
                raise _Failed(Failure.OVERFLOW, "UO", 503) from None
            except (TimeoutError, OSError) as exc:
                if isinstance(exc, asyncio.TimeoutError) and loop_deadline is not None \
                        and time.monotonic() >= loop_deadline:
                    raise _Failed(Failure.PER_TRY_TIMEOUT, "UT", 504) from None
                raise _Failed(Failure.CONNECT_FAILURE, "UF", 503) from None
            if not reused:
                self.stats["upstream_connects"] += 1
            try:
                up.parser.expect(head.method, upgrade=head.upgrade)
                framing = head.framing
                up.channel.write(serialize_request_head(
                    head.method, head.target, headers, framing=framing,
                    content_length=head.content_length if framing == "length" else None,
                    upgrade=head.get(b"upgrade") if head.upgrade_to else None))
                await body.send(up.channel)
                while True:
                    ev = await asyncio.wait_for(up.channel.next_event(),
                                                _remaining(loop_deadline, None))
                    if isinstance(ev, ResponseHead) and ev.informational:
                        continue  # 100-continue and friends: the final answer follows
                    break
            except TimeoutError:
                up.channel.close()
                raise _Failed(Failure.PER_TRY_TIMEOUT, "UT", 504) from None
            except (ChannelClosed, ConnectionError, OSError):
                up.channel.close()
                ev = None
            if isinstance(ev, ResponseHead):
                return ev, up
            up.channel.close()
            if reused and not fresh and body.replayable:
                continue  # the server closed an idle connection as we reused it: once more, fresh
            raise _Failed(Failure.RESET, "UC", 503)
        raise _Failed(Failure.RESET, "UC", 503)

    async def _respond(self, down: EventChannel, req: RequestHead, resp: ResponseHead,
                       up: Upstream | None, rec: RequestRecord) -> bool:
        """Stream the response to the client; whether the client connection stays open."""
        assert up is not None
        rec.status = resp.status
        keep = req.keep_alive and resp.keep_alive
        framing = resp.framing
        if framing == "eof" and req.version == "1.1" and keep:
            framing = "chunked"  # keep the client's connection: re-frame an EOF-delimited body
        if framing == "eof":
            keep = False
        upgrade = resp.get(b"upgrade") if resp.status == 101 else None
        head = serialize_response_head(
            resp.status, resp.reason, resp.headers, framing=framing,
            content_length=resp.content_length if framing in ("length", "none") and
            resp.content_length is not None else None,
            keep_alive=keep, upgrade=upgrade,
            peer_version=req.version)
        if resp.status == 101 or (req.method == b"CONNECT" and 200 <= resp.status < 300):
            down.write(head)
            await _tunnel(down, up.channel, rec)
            return False
        chunked = framing == "chunked"
        # What arrived together leaves together: the head and the body pieces already
        # parsed go out in one send; we flush before waiting for more, or past a size.
        out, held = [head], len(head)
        upch = up.channel
        while True:
            if out and (held >= FLUSH_BYTES or not upch.ready()):
                down.write_many(out)
                out, held = [], 0
                await down.drain()
            ev = await upch.next_event()
            if ev is None or isinstance(ev, ProtocolError):
                # The upstream broke off mid-body: the client must not mistake a
                # truncated body for a whole one.
                rec.flags.append("UPE" if isinstance(ev, ProtocolError) else "UC")
                down.abort()
                return False
            if isinstance(ev, EndOfMessage):
                if chunked:
                    out.append(serialize_last_chunk(ev.trailers))
                down.write_many(out)
                await down.drain()
                return keep
            if isinstance(ev, Body):
                rec.response_bytes += len(ev.data)
                piece = serialize_chunk(ev.data) if chunked else ev.data
                out.append(piece)
                held += len(piece)


async def _tunnel(down: EventChannel, up: EventChannel, rec: RequestRecord) -> None:
    """After 101 (WebSocket) or CONNECT: raw bytes both ways until either side ends."""

    async def pump(src: EventChannel, dst: EventChannel) -> None:
        while True:
            ev = await src.next_event()
            if ev is None:
                if dst.transport is not None and dst.transport.can_write_eof() and not dst.closed:
                    dst.transport.write_eof()
                return
            if isinstance(ev, Upgraded) and ev.data:
                dst.write(ev.data)
                await dst.drain()

    try:
        await asyncio.gather(pump(down, up), pump(up, down))
    except (ChannelClosed, ConnectionError):
        pass
    finally:
        up.close()


async def _discard(body: RequestBody) -> bool:
    """Read and drop a request body we answered without forwarding, so the next
    pipelined request can be read; whether the connection is still usable."""
    while not body.complete:
        ev = await body.down.next_event()
        if ev is None or isinstance(ev, ProtocolError):
            return False
        if isinstance(ev, EndOfMessage):
            return True
    return True


def _remaining(deadline: float | None, per_try: float | None) -> float | None:
    left = None if deadline is None else max(0.0, deadline - time.monotonic())
    if per_try is not None:
        left = per_try if left is None else min(left, per_try)
    return left


def new_channel() -> tuple[RequestParser, EventChannel]:
    parser = RequestParser()
    return parser, EventChannel(parser.feed, parser.feed_eof)
