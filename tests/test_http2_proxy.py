"""The HTTP/2 and gRPC path of the node proxy (dataplane/http2_proxy.py) in one process, over
loopback: grpcio clients and servers, curl, and small HTTP/2 peers built on H2Endpoint for what
real clients do not do on demand (stop reading, GOAWAY mid-connection, reset a stream). Proves
per-stream balancing over pooled upstream connections, trailers and resets passing both ways,
flow control end to end with bounded buffering, GOAWAY on both sides, and the resilience
features (timeout, retry on a gRPC status, circuit breaker, rate limit).

Root: upstream sockets are made as the agent makes them (in a netns, with SO_MARK), here in
the test's own netns.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import random
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from types import MappingProxyType
from typing import Any, TypeVar

import pytest
from hyperframe.frame import GoAwayFrame

from dataplane.backend import Backend
from dataplane.http1_proxy import RequestRecord
from dataplane.http2_proxy import MAX_STREAMS_PER_UPSTREAM, Http2Proxy
from dataplane.policy.circuit_breaker import CircuitBreakerConfig
from dataplane.policy.outlier import OutlierConfig
from dataplane.policy.ratelimit import TokenBucketConfig
from dataplane.policy.retry import RetryPolicy
from dataplane.protocols.http2 import (
    DEFAULT_STREAM_WINDOW,
    Data,
    ErrorCodes,
    Event,
    H2Endpoint,
    RequestHeaders,
    ResponseHeaders,
    StreamReset,
    Trailers,
)
from dataplane.routing import Route, RouteAction, RouteTable, WeightedCluster
from dataplane.services import ClusterConfig, ServiceEntry, ServiceTable
from dataplane.upstreams import Upstreams
from sandbox import grpc_apps

pytestmark = pytest.mark.root
T = TypeVar("T")
CLUSTER = "outbound|50051||greeter.shop.svc.cluster.local"
NO_PROXY_ENV = {k: v for k, v in os.environ.items()
                if k.lower() not in ("http_proxy", "https_proxy", "grpc_proxy", "all_proxy")}


class _Handover(asyncio.Protocol):
    """What OutboundProxy does for a port declared grpc: pause, then hand the transport over."""

    def __init__(self, harness: Harness, entry: ServiceEntry) -> None:
        self.harness = harness
        self.entry = entry

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.pause_reading()  # type: ignore[attr-defined]
        h = self.harness
        self.task = asyncio.get_running_loop().create_task(
            h.proxy.serve("shop/client", "127.0.0.1", h.netns_fd, self.entry, transport, b""))
        h.served.append(self.task)


class Harness:
    """An Http2Proxy on loopback listeners, its event loop in a thread of its own."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.netns_fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self.upstreams = Upstreams(random.Random(7))
        self.records: list[RequestRecord] = []
        self.proxy = Http2Proxy(self.upstreams, 1.0, on_request=self.records.append)
        self.served: list[asyncio.Task[Any]] = []
        self.servers: list[asyncio.AbstractServer] = []

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def service(self, ports: list[int], *, timeout: float | None = None, retry: RetryPolicy | None = None,
                rate_limit: TokenBucketConfig | None = None,
                breaker: CircuitBreakerConfig | None = None, outlier: OutlierConfig | None = None,
                prefix: str = "/") -> str:
        """A service over backends on these loopback ports; returns the proxy's address."""
        backends = tuple(Backend("127.0.0.1", p, f"pod-{p}") for p in ports)
        cluster = ClusterConfig(name=CLUSTER, service="shop/greeter", backends=backends,
                                circuit_breaker=breaker or CircuitBreakerConfig(), outlier=outlier)
        routes = RouteTable("greeter", routes=(Route(
            "default", RouteAction(clusters=(WeightedCluster(CLUSTER, 1),), timeout=timeout, retry=retry),
            prefix=prefix),), rate_limit=rate_limit)
        entry = ServiceEntry(id=1, service="shop/greeter", port_name="grpc", vip="198.19.9.9", port=50051,
                             backends=backends, protocol="grpc", cluster=CLUSTER, routes=routes)

        async def start() -> int:
            self.upstreams.sync(ServiceTable(MappingProxyType({}), MappingProxyType({CLUSTER: cluster})))
            srv = await self.loop.create_server(lambda: _Handover(self, entry), "127.0.0.1", 0)
            self.servers.append(srv)
            return int(srv.sockets[0].getsockname()[1])

        return f"127.0.0.1:{self.run(start())}"

    def wait_records(self, n: int, timeout: float = 10) -> list[RequestRecord]:
        deadline = time.monotonic() + timeout
        while len(self.records) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        return list(self.records)

    def close(self) -> None:
        async def stop() -> None:
            for srv in self.servers:
                srv.close()
            for task in self.served:
                task.cancel()
            await asyncio.gather(*self.served, return_exceptions=True)
            self.proxy.close()
            await asyncio.sleep(0.05)

        self.run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        os.close(self.netns_fd)


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
def greeters() -> Iterator[list[tuple[int, grpc_apps.Servicer]]]:
    """Three sandbox gRPC servers on loopback."""
    started = [grpc_apps.make_server(f"greeter-{i}", 0, "127.0.0.1") for i in range(3)]
    try:
        yield [(port, servicer) for _, port, servicer in started]
    finally:
        for srv, _, _ in started:
            srv.stop(0)


# -- gRPC through the proxy ------------------------------------------------------------------

def test_one_channel_is_balanced_per_call_over_pooled_upstream_connections(
        harness: Harness, greeters: list[tuple[int, grpc_apps.Servicer]]) -> None:
    target = harness.service([p for p, _ in greeters])
    res = grpc_apps.unary_calls(target, "Hello", b"hi", 300)
    assert res["ok"] == 300, res["codes"]
    assert set(res["servers"]) == {"greeter-0", "greeter-1", "greeter-2"}
    assert min(res["servers"].values()) >= 80, res["servers"]
    # Multiplexed and pooled: one upstream connection per backend carried all 300 calls.
    assert harness.proxy.stats["upstream_connects"] == 3
    assert harness.proxy.open_upstream_connections() == 3
    recs = harness.wait_records(300)
    assert len(recs) == 300
    assert {(r.status, r.grpc_status, r.protocol, r.response_flags) for r in recs} == {
        (200, "0", "HTTP/2", "-")}
    assert {r.path for r in recs} == {"/nodemesh.sandbox.Hello/Hello"}
    assert all(r.request_bytes == 7 and r.response_bytes > 5 for r in recs)  # 5-byte frame + "hi"


def test_grpc_error_status_and_trailing_metadata_reach_the_client_unchanged(
        harness: Harness, greeters: list[tuple[int, grpc_apps.Servicer]]) -> None:
    target = harness.service([greeters[0][0]])
    res = grpc_apps.unary_calls(target, "Fail", json.dumps({"code": "NOT_FOUND",
                                                            "message": "no such order 42"}).encode(), 3)
    assert res["codes"] == {"NOT_FOUND": 3}
    for r in res["results"]:
        assert r["details"] == "no such order 42"
        assert r["trailers"]["x-failed-by"] == "greeter-0"
        assert r["trailers"]["x-bin-bin"] == "0001feff"  # binary metadata, byte-exact
    recs = harness.wait_records(3)
    assert {(r.status, r.grpc_status) for r in recs} == {(200, "5")}


def test_an_8_mib_message_and_a_bidirectional_stream_pass_byte_exact(
        harness: Harness, greeters: list[tuple[int, grpc_apps.Servicer]]) -> None:
    target = harness.service([greeters[0][0]])
    res = grpc_apps.echo_call(target, 8 << 20)
    assert res["exact"] and res["received"] == 8 << 20, res
    assert res["trailers"]["x-served-by"] == "greeter-0"
    res = grpc_apps.stream_call(target, messages=40, size=200_000)
    assert res == {"messages": 40, "bytes": 40 * 200_000, "exact": True}
    recs = harness.wait_records(2)
    assert recs[0].request_bytes == recs[0].response_bytes == (8 << 20) + 5


def test_a_client_cancel_resets_the_upstream_stream(
        harness: Harness, greeters: list[tuple[int, grpc_apps.Servicer]]) -> None:
    port, servicer = greeters[0]
    target = harness.service([port])
    t0 = time.monotonic()
    res = grpc_apps.cancel_call(target, after=0.5, ms=20_000)
    assert res == {"cancelled": True, "code": "CANCELLED"}
    deadline = time.monotonic() + 5
    while servicer.cancelled == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert servicer.cancelled == 1  # the server saw RST_STREAM(CANCEL), not a 20 s wait
    assert time.monotonic() - t0 < 5
    rec = harness.wait_records(1)[0]
    assert rec.flags == ["DR"] and rec.grpc_status == "1" and rec.status == 0
    assert harness.proxy.stats["client_resets"] == 1


def test_route_timeout_is_deadline_exceeded_and_cancels_upstream(
        harness: Harness, greeters: list[tuple[int, grpc_apps.Servicer]]) -> None:
    port, servicer = greeters[0]
    target = harness.service([port], timeout=0.3)
    t0 = time.monotonic()
    res = grpc_apps.unary_calls(target, "Slow", b'{"ms": 5000}', 1)
    assert time.monotonic() - t0 < 2
    r = res["results"][0]
    assert r["code"] == "DEADLINE_EXCEEDED", r
    assert (r["initial"] | r["trailers"]).get("x-nodemesh-response-flags") == "UT"
    deadline = time.monotonic() + 5
    while servicer.cancelled == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert servicer.cancelled == 1
    rec = harness.wait_records(1)[0]
    assert rec.flags == ["UT"] and rec.grpc_status == "4"


def test_retry_on_a_grpc_status_from_a_trailers_only_reply(
        harness: Harness, greeters: list[tuple[int, grpc_apps.Servicer]]) -> None:
    flaky = b'{"every": 3}'
    plain = harness.service([greeters[0][0]])
    res = grpc_apps.unary_calls(plain, "Flaky", flaky, 30)
    assert res["codes"] == {"OK": 20, "UNAVAILABLE": 10}  # without a policy the client sees them
    retried = harness.service([greeters[1][0]], retry=RetryPolicy.from_envoy("unavailable", 2))
    res = grpc_apps.unary_calls(retried, "Flaky", flaky, 30)
    assert res["codes"] == {"OK": 30}
    assert harness.proxy.stats["retries"] == 14  # call 3, 6, ... of 44 on greeter-1 failed


def test_circuit_breaker_rejects_the_request_over_the_limit(
        harness: Harness, greeters: list[tuple[int, grpc_apps.Servicer]]) -> None:
    target = harness.service([greeters[0][0]], breaker=CircuitBreakerConfig(max_requests=2))
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        slow = [pool.submit(grpc_apps.unary_calls, target, "Slow", b'{"ms": 1500}', 1) for _ in range(2)]
        time.sleep(0.5)
        third = grpc_apps.unary_calls(target, "Hello", b"", 1)["results"][0]
        assert all(f.result()["ok"] == 1 for f in slow)
    assert third["code"] == "UNAVAILABLE"
    assert (third["initial"] | third["trailers"])["x-nodemesh-response-flags"] == "UO"


def test_a_grpc_error_status_feeds_outlier_detection(
        harness: Harness, greeters: list[tuple[int, grpc_apps.Servicer]]) -> None:
    port = greeters[0][0]
    target = harness.service([port], outlier=OutlierConfig(consecutive_5xx=3, max_ejection_percent=100))
    ask = json.dumps({"code": "UNAVAILABLE"}).encode()
    res = grpc_apps.unary_calls(target, "Fail", ask, 3)
    assert res["codes"] == {"UNAVAILABLE": 3}
    runtime = harness.upstreams.clusters[CLUSTER]
    assert runtime.outlier is not None
    # HTTP 200 each time, but grpc-status 14 counts as a 503 (Envoy's grpcToHttpStatus).
    assert runtime.outlier.ejections(Backend("127.0.0.1", port, f"pod-{port}")) == 1


def test_rate_limit_answers_unavailable_to_grpc(
        harness: Harness, greeters: list[tuple[int, grpc_apps.Servicer]]) -> None:
    target = harness.service([greeters[0][0]], rate_limit=TokenBucketConfig(max_tokens=5, fill_interval=60))
    res = grpc_apps.unary_calls(target, "Hello", b"", 12)
    assert res["codes"] == {"OK": 5, "UNAVAILABLE": 7}
    limited = [r for r in res["results"] if not r["ok"]]
    assert all((r["initial"] | r["trailers"])["x-nodemesh-response-flags"] == "RL" for r in limited)


# -- plain HTTP/2 through the proxy ---------------------------------------------------------

class Origin(asyncio.Protocol):
    """A small HTTP/2 server on H2Endpoint. Paths: /big/<n> streams n bytes (honouring the
    window), /reset/<code> answers a head then resets the stream, /slow/<ms> answers late,
    anything else 200 "ok". With ``goaway_on`` it answers the first request of a connection
    and meets the second with GOAWAY(last stream = the first), leaving it unanswered."""

    connections = 0
    sent = 0
    goaway_on = False

    def __init__(self) -> None:
        self.h2 = H2Endpoint(False)
        self.requests = 0
        self.outbox: dict[int, memoryview] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        type(self).connections += 1
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.transport.write(self.h2.initiate())

    def data_received(self, data: bytes) -> None:
        for ev in self.h2.receive(data):
            if isinstance(ev, RequestHeaders):
                self._request(ev)
            elif isinstance(ev, Data):
                self.h2.acknowledge(ev.stream_id, ev.flow_controlled_length)
            elif isinstance(ev, StreamReset):
                self.outbox.pop(ev.stream_id, None)
        self._flush()

    def _request(self, ev: RequestHeaders) -> None:
        self.requests += 1
        sid = ev.stream_id
        path = dict(ev.headers)[b":path"].decode()
        if self.goaway_on and self.requests == 2:
            self.h2._conn.close_connection(0, last_stream_id=sid - 2)  # noqa: SLF001 - a test peer
            return
        if path.startswith("/big/"):
            self.h2.send_headers(sid, [(":status", "200")])
            self.outbox[sid] = memoryview(grpc_apps.pattern(int(path[5:])))
        elif path.startswith("/reset/"):
            self.h2.send_headers(sid, [(":status", "200")])
            self.h2.reset(sid, int(path[7:]))
        elif path.startswith("/slow/"):
            asyncio.get_running_loop().call_later(int(path[6:]) / 1000, self._late, sid)
        else:
            self.h2.send_headers(sid, [(":status", "200"), ("x-conn", str(type(self).connections))])
            self.outbox[sid] = memoryview(b"ok\n")

    def _late(self, sid: int) -> None:
        self.h2.send_headers(sid, [(":status", "200")])
        self.outbox[sid] = memoryview(b"late\n")
        self._flush()

    def _flush(self) -> None:
        for sid, rest in list(self.outbox.items()):
            n = self.h2.send_data(sid, rest, end_stream=True)
            type(self).sent += n
            if n == len(rest):
                del self.outbox[sid]
            else:
                self.outbox[sid] = rest[n:]
        self.transport.write(self.h2.data_to_send())


class RawClient(asyncio.Protocol):
    """An HTTP/2 client that acknowledges received data only when told to: a slow reader."""

    def __init__(self, window: int = 65535) -> None:
        self.h2 = H2Endpoint(True, stream_window=window, connection_window=window)
        self.events: list[Event] = []
        self.changed = asyncio.Event()
        self.reading = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.transport.write(self.h2.initiate())

    def data_received(self, data: bytes) -> None:
        for ev in self.h2.receive(data):
            self.events.append(ev)
            if isinstance(ev, Data) and self.reading:
                self.h2.acknowledge(ev.stream_id, ev.flow_controlled_length)
        self.transport.write(self.h2.data_to_send())
        self.changed.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.changed.set()

    def get(self, path: str) -> int:
        sid = self.h2.new_stream_id()
        self.h2.send_headers(sid, [(":method", "GET"), (":scheme", "http"), (":authority", "greeter"),
                                   (":path", path)], end_stream=True)
        self.transport.write(self.h2.data_to_send())
        return sid

    def read_all(self) -> None:
        """Start reading: acknowledge what came and what comes."""
        self.reading = True
        for ev in self.events:
            if isinstance(ev, Data):
                self.h2.acknowledge(ev.stream_id, ev.flow_controlled_length)
        self.transport.write(self.h2.data_to_send())

    def body(self, sid: int) -> bytes:
        return b"".join(e.data for e in self.events if isinstance(e, Data) and e.stream_id == sid)

    def ended(self, sid: int) -> bool:
        return any(isinstance(e, (Data, Trailers)) and e.stream_id == sid and
                   (isinstance(e, Trailers) or e.end_stream) for e in self.events)

    async def until(self, predicate: Callable[[], bool], timeout: float = 10) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate():
            self.changed.clear()
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise AssertionError("timed out waiting for the client's condition")
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except TimeoutError:
                pass


@pytest.fixture
def origin(harness: Harness) -> Iterator[int]:
    Origin.connections = Origin.sent = 0
    Origin.goaway_on = False
    srv = harness.run(harness.loop.create_server(Origin, "127.0.0.1", 0))
    try:
        yield int(srv.sockets[0].getsockname()[1])
    finally:
        harness.loop.call_soon_threadsafe(srv.close)


def _connect(harness: Harness, target: str, window: int = 65535) -> RawClient:
    host, port = target.split(":")

    async def go() -> RawClient:
        _, client = await harness.loop.create_connection(lambda: RawClient(window), host, int(port))
        return client

    return harness.run(go())


def test_a_slow_reader_throttles_the_upstream_and_the_proxy_holds_at_most_a_window(
        harness: Harness, origin: int) -> None:
    size = 32 << 20
    target = harness.service([origin])
    client = _connect(harness, target)
    sid = harness.run(_call(client.get, f"/big/{size}"))
    time.sleep(1.5)  # the client reads nothing: everything stalls at the windows
    stalled = Origin.sent
    held = harness.run(_call(harness.proxy.buffered))
    # The origin got only the proxy's upstream stream window (plus what the proxy handed the
    # client's 64 KiB window); the proxy holds no more than that window.
    assert stalled <= DEFAULT_STREAM_WINDOW + 65535 + 16384, stalled
    assert held <= DEFAULT_STREAM_WINDOW, held
    time.sleep(0.5)
    assert Origin.sent == stalled  # and it stays stopped

    harness.run(_call(client.read_all))
    harness.run(client.until(lambda: client.ended(sid), timeout=60))
    assert client.body(sid) == grpc_apps.pattern(size)


def test_upstream_goaway_refused_stream_is_retried_on_a_new_connection(
        harness: Harness, origin: int) -> None:
    Origin.goaway_on = True
    target = harness.service([origin])
    client = _connect(harness, target)
    first = harness.run(_call(client.get, "/one"))
    harness.run(client.until(lambda: client.ended(first)))
    second = harness.run(_call(client.get, "/two"))
    harness.run(client.until(lambda: client.ended(second)))
    heads = {e.stream_id: dict(e.headers) for e in client.events if isinstance(e, ResponseHeaders)}
    assert heads[first][b"x-conn"] == b"1"
    assert heads[second][b":status"] == b"200" and heads[second][b"x-conn"] == b"2"
    assert harness.proxy.stats["refused_retries"] == 1
    assert Origin.connections == 2


def test_an_upstream_reset_reaches_the_client_with_its_code(harness: Harness, origin: int) -> None:
    target = harness.service([origin])
    client = _connect(harness, target)
    sid = harness.run(_call(client.get, f"/reset/{int(ErrorCodes.ENHANCE_YOUR_CALM)}"))
    harness.run(client.until(lambda: any(isinstance(e, StreamReset) for e in client.events)))
    assert [e for e in client.events if isinstance(e, StreamReset)] == [
        StreamReset(sid, ErrorCodes.ENHANCE_YOUR_CALM)]
    rec = harness.wait_records(1)[0]
    assert rec.flags == ["UR"] and rec.status == 200


def test_downstream_goaway_lets_open_streams_finish_then_closes(harness: Harness, origin: int) -> None:
    target = harness.service([origin])
    client = _connect(harness, target)

    async def goaway_after_request() -> int:
        sid = client.get("/slow/300")
        # GOAWAY (no new streams from the client; the open one still counts), written past the
        # client's h2, which would stop reading after sending one.
        client.transport.write(GoAwayFrame(0, last_stream_id=0, error_code=0).serialize())
        return sid

    sid = harness.run(goaway_after_request())
    harness.run(client.until(lambda: client.ended(sid) and client.closed))
    assert client.body(sid) == b"late\n"


def test_no_route_is_a_404_local_reply_with_its_flag(harness: Harness, origin: int) -> None:
    target = harness.service([origin], prefix="/api/")
    client = _connect(harness, target)
    sid = harness.run(_call(client.get, "/other"))
    harness.run(client.until(lambda: client.ended(sid)))
    head = next(dict(e.headers) for e in client.events if isinstance(e, ResponseHeaders))
    assert head[b":status"] == b"404" and head[b"x-nodemesh-response-flags"] == b"NR"
    assert client.body(sid) == b"NR\n"


def test_many_concurrent_streams_spill_onto_a_second_upstream_connection(
        harness: Harness, origin: int) -> None:
    target = harness.service([origin])
    client = _connect(harness, target, window=1 << 20)
    n = MAX_STREAMS_PER_UPSTREAM + 20

    async def burst() -> list[int]:
        return [client.get("/slow/300") for _ in range(n)]

    sids = harness.run(burst())
    harness.run(client.until(lambda: all(client.ended(s) for s in sids)))
    assert all(client.body(s) == b"late\n" for s in sids)
    assert Origin.connections == 2


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load (nghttp2-client) not installed")
def test_h2load_through_the_proxy(harness: Harness, origin: int) -> None:
    target = harness.service([origin])
    res = subprocess.run(["h2load", "-n", "500", "-c", "2", "-m", "20", f"http://{target}/"],
                         capture_output=True, text=True, timeout=60, env=NO_PROXY_ENV)
    assert "500 succeeded, 0 failed, 0 errored" in res.stdout, res.stdout + res.stderr


async def _call(fn: Callable[..., T], *args: Any) -> T:
    """Run a plain function on the proxy's loop (the H2 peers are not thread-safe)."""
    return fn(*args)


def _statuses(client: Any, sids: list[int]) -> list[tuple[bytes, bytes | None]]:
    out = []
    for sid in sids:
        head = next(dict(e.headers) for e in client.events
                    if isinstance(e, ResponseHeaders) and e.stream_id == sid)
        out.append((head[b":status"], head.get(b"x-nodemesh-response-flags")))
    return out


def test_max_connections_makes_streams_wait_for_a_slot_instead_of_a_new_connection(
        harness: Harness, origin: int) -> None:
    target = harness.service([origin], breaker=CircuitBreakerConfig(max_connections=1))
    client = _connect(harness, target, window=1 << 20)
    n = MAX_STREAMS_PER_UPSTREAM + 20

    async def burst() -> list[int]:
        return [client.get("/slow/300") for _ in range(n)]

    sids = harness.run(burst())
    harness.run(client.until(lambda: all(client.ended(s) for s in sids)))
    assert all(client.body(s) == b"late\n" for s in sids)  # the extra 20 waited, then ran
    assert Origin.connections == 1  # and no second connection was opened


def test_max_pending_requests_overflow_is_503_uo(harness: Harness, origin: int) -> None:
    target = harness.service([origin], breaker=CircuitBreakerConfig(max_connections=1,
                                                                      max_pending_requests=5))
    client = _connect(harness, target, window=1 << 20)
    n = MAX_STREAMS_PER_UPSTREAM + 20

    async def burst() -> list[int]:
        return [client.get("/slow/300") for _ in range(n)]

    sids = harness.run(burst())
    harness.run(client.until(lambda: all(client.ended(s) for s in sids)))
    statuses = _statuses(client, sids)
    overflowed = [s for s in statuses if s == (b"503", b"UO")]
    assert 10 <= len(overflowed) <= 15, statuses  # 20 over the slots, 5 may wait
    assert statuses.count((b"200", None)) == n - len(overflowed)
    assert Origin.connections == 1
