"""Local rate limiting: the token bucket of Envoy's local_ratelimit filter, one
per route (or per descriptor). A request takes a token or gets a 429.

Refills continuously at ``tokens_per_fill / fill_interval``, as Envoy has
since 1.31 (before, a timer added ``tokens_per_fill`` once per interval): over
any span of time, at most ``max_tokens`` plus the refill of that span pass.
"""

from __future__ import annotations

from dataclasses import dataclass

# Times are binary floats: 0.3 s is slightly less than 0.3, and a bucket
# refilled by exactly one token would otherwise still refuse.
_EPSILON = 1e-9


@dataclass(frozen=True)
class TokenBucketConfig:
    """Envoy's type.v3.TokenBucket (``fill_interval`` in seconds). The bucket
    starts full; ``tokens_per_fill`` defaults to 1 as in Envoy."""

    max_tokens: int
    fill_interval: float
    tokens_per_fill: int = 1

    def __post_init__(self) -> None:
        if self.max_tokens <= 0:
            raise ValueError(f"token bucket max_tokens must be positive, got {self.max_tokens}")
        if self.tokens_per_fill <= 0:
            raise ValueError(f"token bucket tokens_per_fill must be positive, got {self.tokens_per_fill}")
        if self.fill_interval <= 0:
            raise ValueError(f"token bucket fill_interval must be positive, got {self.fill_interval}")

    @property
    def rate(self) -> float:
        """Tokens per second."""
        return self.tokens_per_fill / self.fill_interval


class TokenBucket:
    """A token bucket whose clock is the ``now`` of each call."""

    def __init__(self, config: TokenBucketConfig, now: float) -> None:
        self.config = config
        self._tokens = float(config.max_tokens)
        self._at = now

    def _refill(self, now: float) -> None:
        if now <= self._at:
            return  # a clock that steps back neither refills nor drains
        self._tokens = min(float(self.config.max_tokens),
                           self._tokens + (now - self._at) * self.config.rate)
        self._at = now

    def tokens(self, now: float) -> float:
        """Tokens available at ``now``."""
        self._refill(now)
        return self._tokens

    def allow(self, now: float, tokens: int = 1) -> bool:
        """Take ``tokens`` if the bucket holds them; a refusal takes nothing."""
        self._refill(now)
        if self._tokens + _EPSILON < tokens:
            return False
        self._tokens = max(0.0, self._tokens - tokens)
        return True
