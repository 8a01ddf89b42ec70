"""Per-cluster runtime state that outlives config updates: the balancer, the
circuit breaker, the outlier detector, the rate-limit buckets, and pools of
idle HTTP/1.1 connections. Config is immutable and swapped whole; this state
is kept by cluster name and started over only when a cluster's policy
changes."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

from dataplane.backend import Backend
from dataplane.balancers import Balancer, make_balancer
from dataplane.channel import EventChannel
from dataplane.connect import connect_from_pod
from dataplane.policy.circuit_breaker import CircuitBreaker
from dataplane.policy.outlier import OutlierDetector
from dataplane.policy.ratelimit import TokenBucket, TokenBucketConfig
from dataplane.protocols.http1 import ResponseParser
from dataplane.services import ClusterConfig, ServiceTable

IDLE_PER_BACKEND = 64  # idle keep-alive connections kept per (pod, backend)


@dataclass
class ClusterRuntime:
    config: ClusterConfig
    balancer: Balancer
    breaker: CircuitBreaker
    outlier: OutlierDetector | None

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
    async def acquire(self, pod_key: str, netns_fd: int, backend: Backend,
                      timeout: float) -> tuple[Upstream, bool]:
        """An idle connection to ``backend`` from this pod, or a new one; and
        whether it was reused (a reused one may turn out closed by the server)."""
        idle = self._idle.get((pod_key, backend))
        while idle:
            up = idle.pop()
            if not (up.channel.closed or up.channel.eof) and up.parser.idle:
                return up, True
            up.channel.close()
        parser = ResponseParser()
        _, channel = await connect_from_pod(
            netns_fd, backend, timeout, lambda: EventChannel(parser.feed, parser.feed_eof))
        return Upstream(channel, parser, backend), False

    def release(self, pod_key: str, up: Upstream, reusable: bool) -> None:
        if not reusable or up.channel.closed or up.channel.eof or not up.parser.idle:
            up.channel.close()
            return
        idle = self._idle.setdefault((pod_key, up.backend), [])
        if len(idle) >= IDLE_PER_BACKEND:
            up.channel.close()
            return
        idle.append(up)

    def close_idle(self) -> None:
        for idle in self._idle.values():
            for up in idle:
                up.channel.close()
        self._idle.clear()
