"""One upstream endpoint, the unit every balancer and policy works on."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Backend:
    ip: str
    port: int
    pod: str | None = None

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"
