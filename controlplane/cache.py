"""What each xDS client should have, kept apart from how a stream delivers it
(the split go-control-plane makes between its cache and its server).

The cache holds the current ``Snapshot`` and a generation number that
streams wait on; it answers "given this subscription and what the client
already holds, what must it receive and what must it drop?"; and it keeps
per-client accounts (streams, ACKs, NACKs and the last NACK's reason) that
the server fills in, so the control plane can log and count rejections per
client. Nonces, ACK/NACK detection and subscription parsing live in
``server.py``.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import any_pb2

from controlplane import naming
from controlplane.translate import Resource, Snapshot

WILDCARD = "*"
# Legacy wildcard (an empty first request) and the full-state rule of the
# state-of-the-world protocol apply to these two types only.
GLOBAL_TYPES = frozenset((naming.LISTENER, naming.CLUSTER))
# How many disconnected clients keep their accounts.
FORGET_AFTER = 1024


@dataclass(frozen=True)
class Subscription:
    """What a client asked for, for one type: everything, named resources, or both."""

    wildcard: bool = False
    names: frozenset[str] = frozenset()

    def covers(self, name: str) -> bool:
        return self.wildcard or name in self.names


def ordered_types(type_urls: Iterable[str]) -> list[str]:
    """Make-before-break: clusters, endpoints, listeners, routes; then anything else."""
    present = set(type_urls)
    return [t for t in naming.TYPE_ORDER if t in present] + sorted(present - set(naming.TYPE_ORDER))


def fingerprint(snapshot: Snapshot) -> tuple[str, ...]:
    """Equal for two snapshots iff no resource of any type differs."""
    return tuple(snapshot.type_version(t) for t in naming.TYPE_ORDER)


def selected(snapshot: Snapshot, type_url: str, sub: Subscription) -> dict[str, Resource]:
    """The existing resources a subscription covers."""
    current = snapshot.of(type_url)
    if sub.wildcard:
        return dict(current)
    return {n: current[n] for n in sub.names if n in current}


@dataclass(frozen=True)
class Delta:
    """An incremental update: resources to (re)send and names to drop."""

    resources: tuple[Resource, ...] = ()
    removed: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.resources or self.removed)


def delta(snapshot: Snapshot, type_url: str, sub: Subscription, known: Mapping[str, str],
          forced: frozenset[str] | set[str] = frozenset(),
          candidates: Iterable[str] | None = None) -> Delta:
    """What a delta client holding ``known`` (name -> version) must receive.

    A covered resource is sent when the client lacks it or holds another
    version; a name the client holds that no longer exists is removed. Names
    in ``forced`` must be answered even if the client seems up to date: a
    fresh subscription (sent, or removed when it does not exist) or a name
    unsubscribed while a wildcard still covers it. ``candidates`` limits the
    search to names that changed since the client was last brought up to date.
    """
    current = snapshot.of(type_url)
    if candidates is not None:
        names = set(candidates) | set(forced)
    else:
        names = set(known) | set(forced) | set(sub.names)
        if sub.wildcard:
            names |= set(current)
    send: list[Resource] = []
    removed: list[str] = []
    for name in sorted(names):
        res = current.get(name)
        if res is None:
            if name in known or name in forced:
                removed.append(name)
        elif sub.covers(name) and (known.get(name) != res.version or name in forced):
            send.append(res)
    return Delta(tuple(send), tuple(removed))


# -- per-client accounts -----------------------------------------------------------


@dataclass(frozen=True)
class Nack:
    type_url: str
    version: str  # the version the client rejected
    nonce: str
    message: str
    at: float


@dataclass
class ClientRecord:
    """One client (by node id) as the server has seen it. Mutable bookkeeping,
    not configuration: only the server's streams write it, on the event loop."""

    node_id: str
    streams: dict[int, str] = field(default_factory=dict)  # stream id -> "sotw|delta peer"
    acks: Counter[str] = field(default_factory=Counter)  # by type URL
    nacks: Counter[str] = field(default_factory=Counter)
    acked_versions: dict[str, str] = field(default_factory=dict)
    last_nack: Nack | None = None
    last_seen: float = field(default_factory=time.time)

    @property
    def nack_total(self) -> int:
        return sum(self.nacks.values())

    def report(self) -> dict[str, Any]:
        short = naming.SHORT
        return {
            "node": self.node_id, "streams": len(self.streams),
            "acks": {short.get(t, t): n for t, n in sorted(self.acks.items())},
            "nacks": {short.get(t, t): n for t, n in sorted(self.nacks.items())},
            "acked_versions": {short.get(t, t): v for t, v in sorted(self.acked_versions.items())},
            "last_nack": None if self.last_nack is None else {
                "type": short.get(self.last_nack.type_url, self.last_nack.type_url),
                "version": self.last_nack.version, "nonce": self.last_nack.nonce,
                "message": self.last_nack.message, "at": self.last_nack.at},
        }


class SnapshotCache:
    """The current snapshot, a generation counter streams wait on, and the
    per-client accounts. Use from one event loop."""

    def __init__(self, snapshot: Snapshot | None = None) -> None:
        self._snapshot = snapshot if snapshot is not None else Snapshot()
        self._generation = 0
        self._changed = asyncio.Event()
        self._packed: dict[tuple[str, str, str], any_pb2.Any] = {}
        self._diffs: dict[tuple[int, int, str], tuple[Snapshot, Snapshot, frozenset[str]]] = {}
        self.clients: dict[str, ClientRecord] = {}

    # -- the snapshot ------------------------------------------------------------------
    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    @property
    def generation(self) -> int:
        return self._generation

    def set_snapshot(self, snapshot: Snapshot) -> int:
        """Swap in a new snapshot and wake every stream waiting for one."""
        self._snapshot = snapshot
        self._generation += 1
        live = {(t, r.name, r.version) for t in snapshot.resources for r in snapshot.of(t).values()}
        self._packed = {k: v for k, v in self._packed.items() if k in live}
        woken, self._changed = self._changed, asyncio.Event()
        woken.set()
        return self._generation

    async def wait_newer(self, generation: int) -> int:
        """Return once the generation is past ``generation``: the new one."""
        while self._generation <= generation:
            await self._changed.wait()
        return self._generation

    def changed_names(self, old: Snapshot, new: Snapshot, type_url: str) -> frozenset[str]:
        """Names added, removed or changed between two snapshots, worked out once
        per pair however many streams ask (they all move between the same ones)."""
        key = (id(old), id(new), type_url)
        hit = self._diffs.get(key)
        if hit is not None and hit[0] is old and hit[1] is new:
            return hit[2]
        a, b = old.of(type_url), new.of(type_url)
        names = frozenset((a.keys() ^ b.keys())
                          | {n for n in a.keys() & b.keys() if a[n].version != b[n].version})
        if len(self._diffs) >= 64:
            self._diffs.clear()
        self._diffs[key] = (old, new, names)
        return names

    def packed(self, type_url: str, res: Resource) -> any_pb2.Any:
        """The resource as an ``Any``, encoded once however many clients get it."""
        key = (type_url, res.name, res.version)
        out = self._packed.get(key)
        if out is None:
            out = self._packed[key] = res.packed()
        return out

    # -- per-client accounts --------------------------------------------------------------
    def client(self, node_id: str) -> ClientRecord:
        rec = self.clients.get(node_id)
        if rec is None:
            rec = self.clients[node_id] = ClientRecord(node_id)
        rec.last_seen = time.time()
        return rec

    def stream_opened(self, node_id: str, stream_id: int, description: str) -> None:
        self.client(node_id).streams[stream_id] = description

    def stream_closed(self, node_id: str, stream_id: int) -> None:
        rec = self.clients.get(node_id)
        if rec is None:
            return
        rec.streams.pop(stream_id, None)
        rec.last_seen = time.time()
        gone = [r for r in self.clients.values() if not r.streams]
        if len(gone) > FORGET_AFTER:
            for r in sorted(gone, key=lambda r: r.last_seen)[: len(gone) - FORGET_AFTER]:
                del self.clients[r.node_id]

    def record_ack(self, node_id: str, type_url: str, version: str) -> None:
        rec = self.client(node_id)
        rec.acks[type_url] += 1
        rec.acked_versions[type_url] = version

    def record_nack(self, node_id: str, type_url: str, version: str, nonce: str,
                    message: str) -> None:
        rec = self.client(node_id)
        rec.nacks[type_url] += 1
        rec.last_nack = Nack(type_url, version, nonce, message, time.time())

    def nacks(self, node_id: str) -> int:
        rec = self.clients.get(node_id)
        return 0 if rec is None else rec.nack_total

    def report(self) -> list[dict[str, Any]]:
        return [self.clients[n].report() for n in sorted(self.clients)]
