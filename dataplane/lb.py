"""Load balancing over a service's ready backends."""

from __future__ import annotations

from collections.abc import Iterator

from dataplane.backend import Backend
from dataplane.services import ServiceEntry


class RoundRobin:
    """Per-service round robin. ``candidates`` yields every backend once,
    starting at the next in turn, so a failed connect can move on to the next
    backend without repeating one."""

    def __init__(self) -> None:
        self._next: dict[tuple[str, int], int] = {}

    def candidates(self, entry: ServiceEntry) -> Iterator[Backend]:
        n = len(entry.backends)
        if n == 0:
            return
        key = (entry.vip, entry.port)
        start = self._next.get(key, 0) % n
        self._next[key] = start + 1
        for i in range(n):
            yield entry.backends[(start + i) % n]
