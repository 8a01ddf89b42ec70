"""HTTP routing: an immutable route table and request matching.

Built by the agent from an xDS RouteConfiguration; matching follows Envoy's
semantics (first match wins, in order): ``prefix`` is a plain string prefix,
``path_separated_prefix`` matches whole path segments (Gateway API's
PathPrefix), ``path`` and ``regex`` match the path without its query string.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from dataplane.balancers import HashPolicy
from dataplane.policy.ratelimit import TokenBucketConfig
from dataplane.policy.retry import RetryPolicy


@dataclass(frozen=True)
class WeightedCluster:
    name: str
    weight: int


@dataclass(frozen=True)
class RouteAction:
    clusters: tuple[WeightedCluster, ...] = ()
    direct_status: int | None = None  # answer locally with this status
    timeout: float | None = None  # whole request; None: no timeout
    retry: RetryPolicy | None = None
    hash_policies: tuple[HashPolicy, ...] = ()

    def pick_cluster(self, rng: random.Random) -> str | None:
        if not self.clusters:
            return None
        if len(self.clusters) == 1:
            return self.clusters[0].name
        total = sum(c.weight for c in self.clusters)
        point = rng.uniform(0, total)
        for c in self.clusters:
            point -= c.weight
            if point < 0:
                return c.name
        return self.clusters[-1].name


@dataclass(frozen=True)
class HeaderMatcher:
    name: str  # lower case; ":method" for the method
    exact: str | None = None
    regex: re.Pattern[str] | None = None
    present: bool = False

    def matches(self, headers: Mapping[str, str]) -> bool:
        value = headers.get(self.name)
        if value is None:
            return False
        if self.exact is not None:
            return value == self.exact
        if self.regex is not None:
            return self.regex.fullmatch(value) is not None
        return self.present


@dataclass(frozen=True)
class Route:
    name: str
    action: RouteAction
    prefix: str | None = None
    separated_prefix: str | None = None
    path: str | None = None
    regex: re.Pattern[str] | None = None
    headers: tuple[HeaderMatcher, ...] = ()

    def matches(self, path: str, headers: Mapping[str, str]) -> bool:
        bare = path.split("?", 1)[0]
        if self.prefix is not None and not path.startswith(self.prefix):
            return False
        if self.separated_prefix is not None:
            p = self.separated_prefix
            if not (bare == p or bare.startswith(p + "/")):
                return False
        if self.path is not None and bare != self.path:
            return False
        if self.regex is not None and self.regex.fullmatch(bare) is None:
            return False
        return all(h.matches(headers) for h in self.headers)


@dataclass(frozen=True)
class RouteTable:
    name: str
    routes: tuple[Route, ...] = ()
    rate_limit: TokenBucketConfig | None = None
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def match(self, path: str, headers: Mapping[str, str]) -> Route | None:
        """``headers``: lower-case names, plus ``:method``."""
        for r in self.routes:
            if r.matches(path, headers):
                return r
        return None
