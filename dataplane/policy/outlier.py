"""Outlier detection: passive health checking of a cluster's backends, as
Envoy's consecutive-5xx and consecutive-gateway-failure detectors do it.

The proxy ``record``s every attempt's result; a backend that fails too many
times in a row is ejected for a while, and ``ejected(now)`` is what the
balancer is told to ``exclude``. Time is only what the caller passes as
``now``: an ejection ends when a call sees its time has run out (Envoy checks
at its next ``interval`` sweep, so up to ``interval`` later).

Follows Envoy's code where its docs say otherwise: ``max_ejection_percent``
is a hard cap (the ejection that would exceed it does not happen), so with
the default 10% a cluster of fewer than 10 hosts ejects nothing unless
``always_eject_one_host`` is set, though the field's description still says
"will eject at least one host regardless". Not implemented: success-rate and
failure-percentage detection, split local/external errors, active health
checks, panic routing.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from dataplane.backend import Backend


class LocalOrigin(Enum):
    """A result the proxy saw itself rather than an upstream status."""

    CONNECT_FAILED = "connect_failed"
    TIMEOUT = "timeout"
    RESET = "reset"
    # An L4 (opaque TCP) connection that succeeded: no HTTP status will follow.
    CONNECT_SUCCESS = "connect_success"


# Envoy (split_external_local_origin_errors off) counts local results as these
# statuses, so they feed both detectors: a timeout is a gateway error too.
_LOCAL_STATUS = {LocalOrigin.CONNECT_FAILED: 503, LocalOrigin.TIMEOUT: 504, LocalOrigin.RESET: 503,
                 LocalOrigin.CONNECT_SUCCESS: 200}


class Detector(Enum):
    CONSECUTIVE_5XX = "consecutive_5xx"
    CONSECUTIVE_GATEWAY_FAILURE = "consecutive_gateway_failure"


@dataclass(frozen=True)
class OutlierConfig:
    """Envoy's Cluster.OutlierDetection fields we implement, with its defaults;
    durations in seconds. ``max_ejection_time`` None means Envoy's default,
    300 s or ``base_ejection_time`` if that is longer. Gateway failures are
    counted but, by Envoy's default enforcement of 0%, never eject."""

    consecutive_5xx: int = 5
    consecutive_gateway_failure: int = 5
    enforcing_consecutive_5xx: int = 100
    enforcing_consecutive_gateway_failure: int = 0
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_time: float | None = None
    max_ejection_time_jitter: float = 0.0
    max_ejection_percent: int = 10
    always_eject_one_host: bool = False

    def __post_init__(self) -> None:
        for name in ("enforcing_consecutive_5xx", "enforcing_consecutive_gateway_failure",
                     "max_ejection_percent"):
            value = getattr(self, name)
            if not 0 <= value <= 100:
                raise ValueError(f"outlier detection {name} is a percentage, 0..100: got {value}")
        for name in ("interval", "base_ejection_time"):
            value = getattr(self, name)
            if value <= 0:
                raise ValueError(f"outlier detection {name} must be positive, got {value}")
        if self.max_ejection_time is not None and self.max_ejection_time < self.base_ejection_time:
            # Envoy rejects this cluster too.
            raise ValueError(f"outlier detection max_ejection_time ({self.max_ejection_time}) cannot be "
                             f"smaller than base_ejection_time ({self.base_ejection_time})")
        if self.max_ejection_time_jitter < 0:
            raise ValueError("outlier detection max_ejection_time_jitter must not be negative")

    @property
    def effective_max_ejection_time(self) -> float:
        if self.max_ejection_time is not None:
            return self.max_ejection_time
        return max(300.0, self.base_ejection_time)


@dataclass(frozen=True)
class Ejection:
    """One ejection that ``record`` enforced."""

    backend: Backend
    detector: Detector
    at: float
    until: float


@dataclass
class _HostState:
    consecutive_5xx: int = 0
    consecutive_gateway_failure: int = 0
    backoff: int = 0  # Envoy's ejection time multiplier: grows per ejection, decays while healthy
    ejections: int = 0
    ejected_until: float | None = None
    readmitted_at: float | None = None


class OutlierDetector:
    """The ejection state of one cluster's hosts (``set_hosts`` follows the
    endpoint set; results for a host not in it are ignored, as in Envoy).
    ``rng`` draws the enforcement percentages and the jitter."""

    def __init__(self, hosts: Iterable[Backend], config: OutlierConfig | None = None,
                 rng: random.Random | None = None) -> None:
        self.config = config if config is not None else OutlierConfig()
        self._rng = rng if rng is not None else random.Random()
        self._hosts: dict[Backend, _HostState] = {}
        self.stats: dict[str, int] = {
            "ejections_overflow": 0, "ejections_enforced_total": 0,
            "ejections_detected_consecutive_5xx": 0, "ejections_enforced_consecutive_5xx": 0,
            "ejections_detected_consecutive_gateway_failure": 0,
            "ejections_enforced_consecutive_gateway_failure": 0,
        }
        self.set_hosts(hosts)

    def set_hosts(self, hosts: Iterable[Backend]) -> None:
        """Follow a new endpoint set: new hosts start clean; removed hosts, and
        their ejections, are forgotten."""
        wanted = set(hosts)
        self._hosts = {b: self._hosts.get(b) or _HostState() for b in wanted}

    def record(self, backend: Backend, result: int | LocalOrigin, now: float) -> Ejection | None:
        """Count one attempt's result (an HTTP status, or a ``LocalOrigin``);
        returns the ejection it caused, if any."""
        self._readmit_expired(now)
        state = self._hosts.get(backend)
        if state is None:
            return None  # a result arriving after its host left the cluster
        status = _LOCAL_STATUS[result] if isinstance(result, LocalOrigin) else result
        triggered: list[Detector] = []
        if 500 <= status <= 599:
            if status in (502, 503, 504):
                state.consecutive_gateway_failure += 1
                # "==", as Envoy: a bout is reported once, then the counter resets.
                if state.consecutive_gateway_failure == self.config.consecutive_gateway_failure:
                    triggered.append(Detector.CONSECUTIVE_GATEWAY_FAILURE)
            else:
                state.consecutive_gateway_failure = 0
            state.consecutive_5xx += 1
            if state.consecutive_5xx == self.config.consecutive_5xx:
                triggered.append(Detector.CONSECUTIVE_5XX)
        else:
            state.consecutive_5xx = 0
            state.consecutive_gateway_failure = 0
        ejection = None
        for detector in triggered:  # gateway first, as Envoy reports them
            if state.ejected_until is not None:
                continue  # already out; Envoy leaves the counter for readmission to reset
            self.stats[f"ejections_detected_{detector.value}"] += 1
            ejection = self._eject(backend, state, detector, now) or ejection
            if detector is Detector.CONSECUTIVE_5XX:
                state.consecutive_5xx = 0
            else:
                state.consecutive_gateway_failure = 0
        return ejection

    def _eject(self, backend: Backend, state: _HostState, detector: Detector, now: float) -> Ejection | None:
        cfg = self.config
        active = self.ejections_active
        # Envoy's test: the share of hosts ejected *after* this ejection must
        # stay within max_ejection_percent.
        allowed = 100.0 * (active + 1) / len(self._hosts) <= cfg.max_ejection_percent
        if not allowed and not (cfg.always_eject_one_host and active == 0):
            self.stats["ejections_overflow"] += 1
            return None
        enforcing = (cfg.enforcing_consecutive_5xx if detector is Detector.CONSECUTIVE_5XX
                     else cfg.enforcing_consecutive_gateway_failure)
        if self._rng.randrange(100) >= enforcing:
            return None  # detected but not enforced: the percentage ramps ejection in
        if state.readmitted_at is not None:
            # Envoy lowers the multiplier by one at each interval sweep the
            # host spends healthy; counted here at once, since there are no sweeps.
            healthy_sweeps = math.floor((now - state.readmitted_at) / cfg.interval)
            state.backoff = max(0, state.backoff - healthy_sweeps)
        max_time = cfg.effective_max_ejection_time
        if state.backoff * cfg.base_ejection_time < max_time + cfg.base_ejection_time:
            state.backoff += 1  # Envoy stops growing it one step past the cap
        duration = min(cfg.base_ejection_time * state.backoff, max_time)
        if cfg.max_ejection_time_jitter > 0:
            # So hosts ejected together do not all return at the same instant.
            duration += self._rng.uniform(0, cfg.max_ejection_time_jitter)
        state.ejections += 1
        state.ejected_until = now + duration
        self.stats["ejections_enforced_total"] += 1
        self.stats[f"ejections_enforced_{detector.value}"] += 1
        return Ejection(backend, detector, now, now + duration)

    def _readmit_expired(self, now: float) -> None:
        for state in self._hosts.values():
            if state.ejected_until is not None and state.ejected_until <= now:
                state.readmitted_at = state.ejected_until
                state.ejected_until = None
                # As Envoy: a fresh start, so a few errors do not re-eject at once.
                state.consecutive_5xx = 0
                state.consecutive_gateway_failure = 0

    @property
    def ejections_active(self) -> int:
        """Hosts ejected as of the last call (no clock of its own: see ``ejected``)."""
        return sum(1 for s in self._hosts.values() if s.ejected_until is not None)

    def is_ejected(self, backend: Backend, now: float) -> bool:
        self._readmit_expired(now)
        state = self._hosts.get(backend)
        return state is not None and state.ejected_until is not None

    def ejected(self, now: float) -> frozenset[Backend]:
        """The hosts out of load balancing at ``now``: the balancer's ``exclude``."""
        self._readmit_expired(now)
        return frozenset(b for b, s in self._hosts.items() if s.ejected_until is not None)

    def ejections(self, backend: Backend) -> int:
        """How many times ``backend`` has been ejected since it joined."""
        state = self._hosts.get(backend)
        return state.ejections if state is not None else 0
