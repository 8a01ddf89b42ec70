"""Per-cluster runtime state that outlives config updates: the balancer, the
circuit breaker, the outlier detector, the rate-limit buckets, and pools of
idle HTTP/1.1 connections. Config is immutable and swapped whole; this state
is kept by cluster name and started over only when a cluster's policy
changes."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

from dataplane.backend import Backend
from dataplane.balancers import Balancer, make_balancer
from dataplane.channel import EventChannel
from dataplane.connect import connect_from_pod
from dataplane.policy.circuit_breaker import CircuitBreaker, Resource
from dataplane.policy.outlier import OutlierDetector
from dataplane.policy.ratelimit import TokenBucket, TokenBucketConfig
from dataplane.protocols.http1 import ResponseParser
from dataplane.services import ClusterConfig, ServiceTable

IDLE_PER_BACKEND = 64  # idle keep-alive connections kept per (pod, backend)


class Overflow(Exception):
    """A circuit breaker limit was hit (Envoy's UO response flag)."""


@dataclass
class ClusterRuntime:
    config: ClusterConfig
    balancer: Balancer
    breaker: CircuitBreaker
    outlier: OutlierDetector | None
    freed: asyncio.Event = field(default_factory=asyncio.Event)

    def connection_closed(self) -> None:
        """One of the cluster's upstream connections went away: wake pending requests."""
        self.breaker.release(Resource.CONNECTIONS)
        self.wake()

    def wake(self) -> None:
        """A connection closed or went idle: pending requests look again."""
        self.freed.set()
        self.freed = asyncio.Event()  # waiters hold the old one; later ones wait anew

    @classmethod
    def start(cls, config: ClusterConfig, rng: random.Random) -> ClusterRuntime:
        balancer = make_balancer(config.lb_policy, rng, least_request=config.least_request,
                                 ring_hash=config.ring_hash)
        outlier = OutlierDetector(config.backends, config.outlier, rng) if config.outlier else None
        return cls(config, balancer, CircuitBreaker(config.circuit_breaker), outlier)

    def update(self, config: ClusterConfig) -> None:
        self.config = config
        if self.outlier is not None:
            self.outlier.set_hosts(config.backends)

    def pick(self, key: bytes | None, tried: set[Backend], now: float) -> Backend | None:
        """A backend neither ejected nor already tried for this request; failing
        that, one merely not tried (an all-ejected cluster still serves, as with
        Envoy's panic threshold); failing that, any (a retry on a one-endpoint
        service goes to the same endpoint again, as in Envoy)."""
        ejected = self.outlier.ejected(now) if self.outlier else frozenset()
        backends = self.config.backends
        return (self.balancer.pick(backends, key, exclude=tried | ejected)
                or self.balancer.pick(backends, key, exclude=tried)
                or self.balancer.pick(backends, key))


@dataclass
class Upstream:
    """One pooled HTTP/1.1 connection to a backend."""

    channel: EventChannel
    parser: ResponseParser
    backend: Backend
    cluster: str | None = None
    owner: ClusterRuntime | None = None  # whose circuit breaker counts this connection
    created: float = field(default_factory=time.monotonic)
    requests: int = 0


class Upstreams:
    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()
        self.clusters: dict[str, ClusterRuntime] = {}
        self._buckets: dict[str, tuple[TokenBucketConfig, TokenBucket]] = {}
        self._idle: dict[tuple[str, Backend], list[Upstream]] = {}

    def sync(self, table: ServiceTable) -> None:
        for name, cfg in table.clusters.items():
            cur = self.clusters.get(name)
            if cur is None or cur.config.policy_key() != cfg.policy_key():
                self.clusters[name] = ClusterRuntime.start(cfg, self.rng)
            else:
                cur.update(cfg)
        for name in set(self.clusters) - set(table.clusters):
            del self.clusters[name]

    def bucket(self, key: str, cfg: TokenBucketConfig, now: float) -> TokenBucket:
        cur = self._buckets.get(key)
        if cur is None or cur[0] != cfg:
            cur = (cfg, TokenBucket(cfg, now))
            self._buckets[key] = cur
        return cur[1]

    # -- HTTP/1.1 pool ---------------------------------------------------------------
    async def acquire(self, pod_key: str, netns_fd: int, backend: Backend, timeout: float,
                      runtime: ClusterRuntime | None = None) -> tuple[Upstream, bool]:
        """An idle connection to ``backend`` from this pod, or a new one; and
        whether it was reused (a reused one may turn out closed by the server).

        With ``runtime``, the cluster's circuit breaker bounds the connections
        (max_connections): at the limit the request waits as a pending one
        (max_pending_requests; beyond it, ``Overflow``) until a connection of the
        cluster closes or an idle one can be given up for it, as Envoy queues."""
        while True:
            idle = self._idle.get((pod_key, backend))
            while idle:
                up = idle.pop()
                # A connection counted by a runtime since replaced (its policy
                # changed) must not slip past the new limits.
                current = runtime is None or up.owner is runtime
                if current and not (up.channel.closed or up.channel.eof) and up.parser.idle:
                    return up, True
                up.channel.close()
            if runtime is None or runtime.breaker.try_acquire(Resource.CONNECTIONS):
                break
            if self._evict_idle(runtime.config.name):
                continue  # an idle connection of the cluster closed: room for ours
            if not runtime.breaker.try_acquire(Resource.PENDING_REQUESTS):
                raise Overflow("max_pending_requests")
            try:
                await runtime.freed.wait()
            finally:
                runtime.breaker.release(Resource.PENDING_REQUESTS)
        parser = ResponseParser()
        try:
            _, channel = await connect_from_pod(
                netns_fd, backend, timeout, lambda: EventChannel(parser.feed, parser.feed_eof))
        except BaseException:
            if runtime is not None:
                runtime.connection_closed()
            raise
        if runtime is not None:
            channel.on_lost = runtime.connection_closed
        return Upstream(channel, parser, backend, cluster=runtime.config.name if runtime else None,
                        owner=runtime), False

    def _evict_idle(self, cluster: str) -> bool:
        for idle in self._idle.values():
            for up in idle:
                if up.cluster == cluster:
                    idle.remove(up)
                    up.channel.close()  # its on_lost frees the slot
                    return True
        return False

    def release(self, pod_key: str, up: Upstream, reusable: bool) -> None:
        runtime = self.clusters.get(up.cluster or "")
        stale = up.owner is not None and up.owner is not runtime
        if stale or not reusable or up.channel.closed or up.channel.eof or not up.parser.idle:
            up.channel.close()
            return
        idle = self._idle.setdefault((pod_key, up.backend), [])
        if len(idle) >= IDLE_PER_BACKEND:
            up.channel.close()
            return
        idle.append(up)
        if runtime is not None:
            runtime.wake()  # a pending request may take it, or close it for another backend

    def close_idle(self) -> None:
        for idle in self._idle.values():
            for up in idle:
                up.channel.close()
        self._idle.clear()
