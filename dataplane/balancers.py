"""Per-request load balancing: the algorithms of an Envoy Cluster's ``lb_policy``.

Sans-IO: a balancer only chooses among the backends it is handed; the proxy
connects, and tells it when a request starts and finishes. The backends to
avoid (ejected by outlier detection, already tried by a retry) come in as
``exclude``, so one balancer serves first tries and retries alike.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from dataplane.backend import Backend


class Balancer:
    """What every algorithm offers the proxy: ``pick`` a backend for one request,
    and ``started``/``finished`` to count the requests in flight per backend
    (LeastRequest balances on those counts; the others keep them for stats)."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng if rng is not None else random.Random()
        self._active: dict[Backend, int] = {}

    def pick(self, backends: Sequence[Backend], key: bytes | None = None,
             exclude: Collection[Backend] = ()) -> Backend | None:
        """The backend for the next request, never one in ``exclude``; None when
        there is none left. ``key`` is the request's hash key (RingHash only)."""
        raise NotImplementedError

    def started(self, backend: Backend) -> None:
        self._active[backend] = self._active.get(backend, 0) + 1

    def finished(self, backend: Backend) -> None:
        n = self._active.get(backend, 0)
        if n == 0:
            raise ValueError(f"finished() for {backend.address} without a matching started(): "
                             "every request must be counted exactly once at each end")
        if n == 1:
            del self._active[backend]  # keep the map bounded by what is in flight
        else:
            self._active[backend] = n - 1

    def active(self, backend: Backend) -> int:
        """Requests in flight to ``backend``."""
        return self._active.get(backend, 0)


def _allowed(backends: Sequence[Backend], exclude: Collection[Backend]) -> list[Backend]:
    if not exclude:
        return list(backends)
    skip = exclude if isinstance(exclude, set | frozenset) else set(exclude)
    return [b for b in backends if b not in skip]


class RoundRobin(Balancer):
    """Envoy's ROUND_ROBIN: each backend in turn, skipping excluded ones."""

    def __init__(self, rng: random.Random | None = None) -> None:
        super().__init__(rng)
        self._next: int | None = None

    def pick(self, backends: Sequence[Backend], key: bytes | None = None,
             exclude: Collection[Backend] = ()) -> Backend | None:
        n = len(backends)
        if n == 0:
            return None
        if self._next is None:
            # Envoy starts at a random index, so that proxies on different nodes
            # do not all send their first requests to the same endpoint.
            self._next = self._rng.randrange(n)
        skip = exclude if isinstance(exclude, set | frozenset) else set(exclude)
        for i in range(n):
            backend = backends[(self._next + i) % n]
            if backend not in skip:
                self._next += i + 1
                return backend
        return None


@dataclass(frozen=True)
class LeastRequestConfig:
    """Envoy's Cluster.LeastRequestLbConfig."""

    choice_count: int = 2

    def __post_init__(self) -> None:
        if self.choice_count < 2:
            raise ValueError(f"least_request choice_count must be at least 2 (as in Envoy), "
                             f"got {self.choice_count}")


class LeastRequest(Balancer):
    """Envoy's LEAST_REQUEST: sample ``choice_count`` backends at random and take
    the one with the fewest requests in flight (power of two choices by default).

    Unlike Envoy, the sample is drawn without replacement: with two backends
    Envoy can draw the same busy one twice; here the idle one always wins."""

    def __init__(self, config: LeastRequestConfig | None = None,
                 rng: random.Random | None = None) -> None:
        super().__init__(rng)
        self.config = config if config is not None else LeastRequestConfig()

    def pick(self, backends: Sequence[Backend], key: bytes | None = None,
             exclude: Collection[Backend] = ()) -> Backend | None:
        candidates = _allowed(backends, exclude)
        if not candidates:
            return None
        sample = self._rng.sample(candidates, min(self.config.choice_count, len(candidates)))
        return min(sample, key=self.active)  # ties go to the first drawn: random


class Random(Balancer):
    """Envoy's RANDOM: a uniformly random allowed backend."""

    def pick(self, backends: Sequence[Backend], key: bytes | None = None,
             exclude: Collection[Backend] = ()) -> Backend | None:
        candidates = _allowed(backends, exclude)
        return self._rng.choice(candidates) if candidates else None


@dataclass(frozen=True)
class RingHashConfig:
    """Envoy's Cluster.RingHashLbConfig (sizes in ring entries)."""

    minimum_ring_size: int = 1024
    maximum_ring_size: int = 8 * 1024 * 1024

    def __post_init__(self) -> None:
        if not 1 <= self.minimum_ring_size <= self.maximum_ring_size <= 8 * 1024 * 1024:
            raise ValueError("ring_hash needs 1 <= minimum_ring_size <= maximum_ring_size <= 8M, got "
                             f"{self.minimum_ring_size} and {self.maximum_ring_size}")


def _hash64(data: bytes) -> int:
    # Envoy uses xxHash64; any stable 64-bit hash keeps the ring's properties,
    # and blake2b is in the standard library.
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def _host_hashes(address: str, count: int) -> list[int]:
    """The ring positions of one host: the first ``count`` of an endless,
    address-seeded sequence, so a host's first k entries never depend on
    how many it has."""
    out: list[int] = []
    block = 0
    while len(out) < count:
        # Eight positions per 64-byte digest: a thousand-host ring builds in
        # a fraction of a second.
        digest = hashlib.blake2b(f"{address}_{block}".encode(), digest_size=64).digest()
        out.extend(int.from_bytes(digest[i:i + 8], "big") for i in range(0, 64, 8))
        block += 1
    return out[:count]


# Each host gets at least this many entries. Envoy divides minimum_ring_size
# among the hosts, so every scale event resizes every host's share and moves
# about twice the keys it must; with a fixed share (the default 1024 / n is
# below it from 4 hosts on) adding or removing a host moves only its own keys.
_STABLE_ENTRIES_PER_HOST = 256


def _entries_per_host(n: int, config: RingHashConfig) -> int:
    if n == 0:
        return 0
    wanted = max(math.ceil(config.minimum_ring_size / n), _STABLE_ENTRIES_PER_HOST)
    return max(1, min(wanted, config.maximum_ring_size // n))


class _Ring:
    """A built ring: sorted entry hashes and the backend owning each."""

    def __init__(self, backends: frozenset[Backend], config: RingHashConfig) -> None:
        per_host = _entries_per_host(len(backends), config)
        hosts = sorted(backends, key=lambda b: b.address)  # ties (2^-64) break the same on every node
        positions: list[int] = []
        owner_of: list[int] = []
        for index, backend in enumerate(hosts):
            positions.extend(_host_hashes(backend.address, per_host))
            owner_of.extend([index] * per_host)
        order = sorted(range(len(positions)), key=positions.__getitem__)
        self.hashes = [positions[i] for i in order]
        self.owners = [hosts[owner_of[i]] for i in order]
        self.distinct = len(hosts)

    def lookup(self, key_hash: int, skip: Collection[Backend]) -> Backend | None:
        size = len(self.hashes)
        start = bisect.bisect_left(self.hashes, key_hash)
        seen: set[Backend] = set()
        # Walking on past excluded owners gives exactly the answer of a ring
        # built without them: an ejected backend moves only its own keys.
        for i in range(size):
            owner = self.owners[(start + i) % size]
            if owner not in skip:
                return owner
            seen.add(owner)
            if len(seen) == self.distinct:
                break
        return None


class RingHash(Balancer):
    """Envoy's RING_HASH: consistent hashing on a ring of virtual nodes, so a
    request key sticks to one backend while the backend set changes around it.
    Without a key the pick is random, as in Envoy."""

    def __init__(self, config: RingHashConfig | None = None,
                 rng: random.Random | None = None) -> None:
        super().__init__(rng)
        self.config = config if config is not None else RingHashConfig()
        self._ring: _Ring | None = None
        self._ring_of: frozenset[Backend] | None = None

    def _ring_for(self, backends: Sequence[Backend]) -> _Ring:
        members = frozenset(backends)
        if self._ring is None or members != self._ring_of:
            # Built over every backend, ejected or not, so ejections never
            # rebuild it; rebuilt only when the endpoint set itself changes.
            self._ring, self._ring_of = _Ring(members, self.config), members
        return self._ring

    def ring_size(self, backends: Sequence[Backend]) -> int:
        return len(self._ring_for(backends).hashes)

    def pick(self, backends: Sequence[Backend], key: bytes | None = None,
             exclude: Collection[Backend] = ()) -> Backend | None:
        if not backends:
            return None
        if key is None:
            candidates = _allowed(backends, exclude)
            return self._rng.choice(candidates) if candidates else None
        skip = exclude if isinstance(exclude, set | frozenset) else set(exclude)
        return self._ring_for(backends).lookup(_hash64(key), skip)


class LbPolicy(StrEnum):
    """The names of Envoy's Cluster.LbPolicy that we implement."""

    ROUND_ROBIN = "ROUND_ROBIN"
    LEAST_REQUEST = "LEAST_REQUEST"
    RING_HASH = "RING_HASH"
    RANDOM = "RANDOM"


def make_balancer(policy: str, rng: random.Random | None = None,
                  least_request: LeastRequestConfig | None = None,
                  ring_hash: RingHashConfig | None = None) -> Balancer:
    """The balancer for a Cluster's ``lb_policy`` name (Envoy's enum spelling)."""
    try:
        which = LbPolicy(policy)
    except ValueError:
        supported = ", ".join(p.value for p in LbPolicy)
        raise ValueError(f"lb_policy {policy!r} is not supported: use one of {supported}") from None
    if which is LbPolicy.ROUND_ROBIN:
        return RoundRobin(rng)
    if which is LbPolicy.LEAST_REQUEST:
        return LeastRequest(least_request, rng)
    if which is LbPolicy.RING_HASH:
        return RingHash(ring_hash, rng)
    return Random(rng)


class HashOn(StrEnum):
    HEADER = "header"
    COOKIE = "cookie"
    SOURCE_IP = "source_ip"


@dataclass(frozen=True)
class HashPolicy:
    """One entry of Envoy's RouteAction.hash_policy: where a request's hash key
    comes from. ``terminal`` stops at this policy when it yields a value."""

    on: HashOn
    name: str = ""
    terminal: bool = False

    def __post_init__(self) -> None:
        if self.on is not HashOn.SOURCE_IP and not self.name:
            raise ValueError(f"a {self.on.value} hash policy needs the {self.on.value} name")

    @classmethod
    def header(cls, name: str, terminal: bool = False) -> HashPolicy:
        return cls(HashOn.HEADER, name, terminal)

    @classmethod
    def cookie(cls, name: str, terminal: bool = False) -> HashPolicy:
        return cls(HashOn.COOKIE, name, terminal)

    @classmethod
    def source_ip(cls, terminal: bool = False) -> HashPolicy:
        return cls(HashOn.SOURCE_IP, "", terminal)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name.lower(), headers.get(name))
    if value is not None:
        return value
    lowered = name.lower()
    return next((v for k, v in headers.items() if k.lower() == lowered), None)


def hash_key_for(policy: HashPolicy | Sequence[HashPolicy], headers: Mapping[str, str],
                 cookies: Mapping[str, str], source_ip: str | None) -> bytes | None:
    """The request's ring-hash key from its hash policies, in order, or None
    when no policy yields a value (the ring then picks at random, as Envoy).

    A single policy's key is the value itself; several are combined in order,
    each length-prefixed so that ("ab", "c") and ("a", "bc") differ. Envoy's
    cookie ``ttl`` (generating a cookie when absent) is the codec's job."""
    policies = (policy,) if isinstance(policy, HashPolicy) else tuple(policy)
    parts: list[bytes] = []
    for p in policies:
        if p.on is HashOn.HEADER:
            value = _header(headers, p.name)
        elif p.on is HashOn.COOKIE:
            value = cookies.get(p.name)
        else:
            value = source_ip
        if value is None:
            continue
        parts.append(value.encode())
        if p.terminal:
            break
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def parse_cookies(headers: Mapping[str, str]) -> dict[str, str]:
    """The request's cookies (from its ``cookie`` header), for cookie hash policies."""
    out = {}
    for part in headers.get("cookie", "").split(";"):
        k, _, v = part.strip().partition("=")
        if k:
            out[k] = v
    return out
