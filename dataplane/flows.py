"""Live L4 flows, for `nodemesh connections`."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Flow:
    id: int
    pod: str
    pod_ip: str | None
    client: str  # the client's address on the in-pod listener
    original_dst: str
    service: str | None = None
    endpoint: str | None = None
    state: str = "connecting"
    bytes_sent: int = 0      # client -> upstream
    bytes_received: int = 0  # upstream -> client
    started: float = field(default_factory=time.monotonic)
    started_wall: float = field(default_factory=time.time)
    meta: Any = None  # telemetry's handle for this connection

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "pod": self.pod, "pod_ip": self.pod_ip, "client": self.client,
            "original_dst": self.original_dst, "service": self.service,
            "endpoint": self.endpoint, "state": self.state, "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "age_seconds": round(time.monotonic() - self.started, 3),
            "started": self.started_wall,
        }


class FlowTable:
    def __init__(self, on_close: Callable[[Flow], None] | None = None) -> None:
        self._flows: dict[int, Flow] = {}
        self._ids = itertools.count(1)
        self.total_opened = 0
        self.on_close = on_close

    def open(self, **kw: Any) -> Flow:
        flow = Flow(id=next(self._ids), **kw)
        self._flows[flow.id] = flow
        self.total_opened += 1
        return flow

    def close(self, flow: Flow) -> None:
        if self._flows.pop(flow.id, None) is not None and self.on_close is not None:
            self.on_close(flow)

    def snapshot(self) -> list[dict[str, Any]]:
        return [f.as_dict() for f in list(self._flows.values())]

    def __len__(self) -> int:
        return len(self._flows)
