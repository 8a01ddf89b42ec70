"""One upstream endpoint, the unit every balancer and policy works on."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property


@dataclass(frozen=True)
class Backend:
    ip: str
    port: int
    pod: str | None = None

    @cached_property  # read for every connection to this endpoint
    def address(self) -> str:
        return f"{self.ip}:{self.port}"
