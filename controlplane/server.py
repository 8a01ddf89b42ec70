"""The ADS server: how one gRPC stream of xDS requests and responses is
handled, state of the world (``StreamAggregatedResources``) and incremental
(``DeltaAggregatedResources``). What a client should have comes from the
cache (``cache.py``); this module owns the protocol around it:

- nonces per stream, the latest one remembered per type. A state-of-the-world
  request that answers an older nonce is stale: no response, no change. A
  delta request with a stale nonce still changes the subscription (the
  protocol requires it) but its ACK or NACK is stale;
- ACK (no ``error_detail``, the version that was sent) and NACK
  (``error_detail``): counted per client in the cache, a NACK logged in one
  line; a rejected version is never resent, the next change is;
- subscriptions: names, ``*``, and the legacy empty first request as a
  wildcard for listeners and clusters; delta subscribe and unsubscribe,
  ``initial_resource_versions`` on the first request of a type,
  ``removed_resources``;
- state of the world sends every covered listener and cluster whenever one of
  them changes (the protocol's full-state rule) but endpoints and routes only
  when they changed; delta sends only resources whose version changed;
- make-before-break: when a change spans several types, one stream's
  responses go out clusters, endpoints, listeners, routes.

A client that disconnects or sends a malformed request ends its own stream,
with one log line, never the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import message as pb_message

from controlplane import naming
from controlplane.cache import (
    GLOBAL_TYPES,
    WILDCARD,
    SnapshotCache,
    Subscription,
    delta,
    ordered_types,
    selected,
)
from controlplane.translate import Snapshot

log = logging.getLogger("nodemesh.controlplane")

CONTROL_PLANE_ID = "nodemesh"
# Requests read ahead of processing, per stream; beyond that gRPC flow
# control holds the client back instead of our memory growing.
MAX_PENDING_REQUESTS = 64


def _short(type_url: str) -> str:
    return naming.SHORT.get(type_url, type_url.rsplit("/", 1)[-1])


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


class ProtocolError(Exception):
    """A request this server cannot take; ends that stream with INVALID_ARGUMENT."""


class _Changed:
    """Event: the cache has a newer snapshot."""


class _End:
    """Event: the client closed its side of the stream."""


CHANGED, END = _Changed(), _End()


@dataclass
class _TypeState:
    """One resource type on one stream."""

    sub: Subscription = field(default_factory=Subscription)
    explicit: bool = False  # named a resource once: an empty list is no longer a wildcard
    sent: dict[str, str] = field(default_factory=dict)  # what the client holds: name -> version
    forced: set[str] = field(default_factory=set)  # delta: names owed an answer
    nonce: str | None = None  # latest nonce sent for this type
    version: str = ""  # version_info of that response
    answered: str | None = None  # the nonce already counted as ACK or NACK


class _Stream:
    """State and event loop shared by both protocol variants."""

    kind = ""

    def __init__(self, cache: SnapshotCache, stream_id: int, peer: str) -> None:
        self.cache = cache
        self.id = stream_id
        self.peer = peer
        self.node_id: str | None = None
        self.types: dict[str, _TypeState] = {}
        # The stream answers from its own snapshot, advanced only when a
        # change is pushed in type order, so that a request answered in
        # between cannot get ahead of make-before-break.
        self.snapshot: Snapshot = cache.snapshot
        self.generation = cache.generation
        self._nonces = itertools.count(1)
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self._room = asyncio.Semaphore(MAX_PENDING_REQUESTS)
        self._change_pending = False

    # -- the loop -------------------------------------------------------------------
    async def run(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
                  ) -> AsyncIterator[Any]:
        reader = asyncio.create_task(self._read(requests))
        watcher = asyncio.create_task(self._watch())
        reason = "closed by the client"
        try:
            while True:
                event = await self._events.get()
                if event is END:
                    return
                if isinstance(event, BaseException):
                    raise event
                try:
                    if event is CHANGED:
                        self._change_pending = False
                        old, self.snapshot = self.snapshot, self.cache.snapshot
                        self.generation = self.cache.generation
                        responses = list(self.on_snapshot(old))
                    else:
                        self._room.release()
                        responses = list(self.on_request(event))
                except ProtocolError as exc:
                    reason = f"malformed request: {exc}"
                    log.warning("xDS %s stream %d from %s: %s; closing it", self.kind, self.id,
                                self.who, exc)
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                    return
                for resp in responses:
                    yield resp
        except asyncio.CancelledError:
            reason = "cancelled (client gone or server stopping)"
            raise
        except pb_message.DecodeError as exc:
            reason = "undecodable request"
            log.warning("xDS %s stream %d from %s: undecodable request (%s); closing it",
                        self.kind, self.id, self.who, _one_line(str(exc)))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"undecodable {self.kind} discovery request")
        finally:
            for task in (reader, watcher):
                task.cancel()
            for task in (reader, watcher):
                with contextlib.suppress(BaseException):
                    await task
            if self.node_id is not None:
                self.cache.stream_closed(self.node_id, self.id)
            log.info("xDS %s stream %d from %s ended: %s", self.kind, self.id, self.who, reason)

    async def _read(self, requests: AsyncIterator[Any]) -> None:
        try:
            async for req in requests:
                await self._room.acquire()
                self._events.put_nowait(req)
            self._events.put_nowait(END)
        except asyncio.CancelledError:
            raise
        except pb_message.DecodeError as exc:
            self._events.put_nowait(exc)
        except Exception:  # the transport failed under us: the stream is over
            self._events.put_nowait(END)

    async def _watch(self) -> None:
        generation = self.generation
        while True:
            generation = await self.cache.wait_newer(generation)
            if not self._change_pending:
                self._change_pending = True
                self._events.put_nowait(CHANGED)

    # -- shared protocol pieces ---------------------------------------------------------
    @property
    def who(self) -> str:
        return f"node {self.node_id!r} ({self.peer})" if self.node_id else self.peer

    def identify(self, req: Any) -> None:
        if self.node_id is not None:
            return
        node_id = req.node.id if req.HasField("node") and req.node.id else f"unidentified@{self.peer}"
        self.node_id = node_id
        self.cache.stream_opened(node_id, self.id, f"{self.kind} {self.peer}")
        log.info("xDS %s stream %d opened by %s", self.kind, self.id, self.who)

    def type_of(self, req: Any) -> str:
        if not req.type_url:
            raise ProtocolError("type_url is required on an aggregated (ADS) stream")
        return str(req.type_url)

    def next_nonce(self) -> str:
        return str(next(self._nonces))

    def ack_or_nack(self, t: str, st: _TypeState, req: Any, version: str) -> None:
        """Count an answer to our latest response for ``t`` (once per nonce), or a
        NACK of an older one: a rejection is worth knowing even when stale."""
        nonce = req.response_nonce
        if not nonce or nonce == st.answered:
            return
        assert self.node_id is not None
        if req.HasField("error_detail"):
            if nonce == st.nonce:
                st.answered = nonce
            rejected = st.version if nonce == st.nonce else "(an earlier one)"
            message = _one_line(req.error_detail.message) or f"code {req.error_detail.code}"
            self.cache.record_nack(self.node_id, t, rejected, nonce, message)
            log.warning("xDS NACK from node %r: %s version %s (nonce %s, NACK #%d from this "
                        "client): %s", self.node_id, _short(t), rejected, nonce,
                        self.cache.nacks(self.node_id), message)
        elif nonce == st.nonce and version == st.version:
            st.answered = nonce
            self.cache.record_ack(self.node_id, t, version)
            log.debug("xDS ACK from node %r: %s version %s", self.node_id, _short(t), version)

    def on_request(self, req: Any) -> Iterator[Any]:
        raise NotImplementedError

    def on_snapshot(self, old: Snapshot) -> Iterator[Any]:
        """Push what changed since ``old``, in make-before-break order. After each
        response a stream's records match its snapshot for everything covered, so
        only names that differ between the two snapshots need a look."""
        for t in ordered_types(self.types):
            changed = self.cache.changed_names(old, self.snapshot, t)
            if changed:
                resp = self.respond(t, self.types[t], force=False, candidates=changed)
                if resp is not None:
                    yield resp

    def respond(self, t: str, st: _TypeState, force: bool,
                candidates: frozenset[str] | None = None) -> Any:
        raise NotImplementedError


class _SotwStream(_Stream):
    kind = "sotw"

    def on_request(self, req: discovery_pb2.DiscoveryRequest) -> Iterator[Any]:
        t = self.type_of(req)
        self.identify(req)
        first = t not in self.types
        st = self.types.setdefault(t, _TypeState())
        if st.nonce is not None and req.response_nonce != st.nonce:
            # Stale: the client has not seen our latest response for this type
            # yet; its next request will carry the subscription it wants.
            self.ack_or_nack(t, st, req, req.version_info)
            log.debug("xDS sotw stream %d: stale nonce %r for %s (latest %s): ignored", self.id,
                      req.response_nonce, _short(t), st.nonce)
            return
        self.ack_or_nack(t, st, req, req.version_info)
        added = self._subscribe(t, st, req.resource_names)
        resp = self.respond(t, st, force=first or added)
        if resp is not None:
            yield resp

    def _subscribe(self, t: str, st: _TypeState, resource_names: Any) -> bool:
        """Apply a full list of names; True when it asks for something new."""
        names = set(resource_names)
        star = WILDCARD in names
        names.discard(WILDCARD)
        if star:
            wildcard = True
        elif not names and not st.explicit and t in GLOBAL_TYPES:
            wildcard = True  # legacy: never named anything, so empty means everything
        else:
            wildcard = False
        if star or names:
            st.explicit = True
        old, new = st.sub, Subscription(wildcard, frozenset(names))
        st.sub = new
        for n in old.names - new.names:
            if not new.wildcard:
                st.sent.pop(n, None)  # the client forgets it
        added = new.names - old.names
        for n in added:
            st.sent.pop(n, None)  # newly requested: resend even if sent before
        return bool(added) or (new.wildcard and not old.wildcard)

    def respond(self, t: str, st: _TypeState, force: bool,
                candidates: frozenset[str] | None = None) -> discovery_pb2.DiscoveryResponse | None:
        current = self.snapshot.of(t)
        if t in GLOBAL_TYPES:
            # Full state: every covered listener/cluster whenever any of them changes.
            if candidates is not None and not force and not any(
                    st.sub.covers(n) for n in candidates):
                return None
            chosen = selected(self.snapshot, t, st.sub)
            versions = {n: r.version for n, r in chosen.items()}
            held = {n: v for n, v in st.sent.items() if st.sub.covers(n)}
            if not force and versions == held:
                return None
            resources = [chosen[n] for n in sorted(chosen)]
            st.sent = versions
        else:
            # Endpoints and routes: only what the client lacks or holds in another version.
            pool = candidates if candidates is not None else (
                set(st.sent) | set(current if st.sub.wildcard else st.sub.names))
            resources = []
            for n in sorted(pool):
                res = current.get(n)
                if res is None or not st.sub.covers(n):
                    st.sent.pop(n, None)  # gone: if it comes back, it is news again
                elif st.sent.get(n) != res.version:
                    resources.append(res)
            if not resources:
                return None
            st.sent.update({r.name: r.version for r in resources})
        st.nonce, st.version = self.next_nonce(), self.snapshot.type_version(t)
        log.debug("xDS sotw stream %d -> %s: %s version %s, %d resources (nonce %s)", self.id,
                  self.who, _short(t), st.version, len(resources), st.nonce)
        return discovery_pb2.DiscoveryResponse(
            version_info=st.version, type_url=t, nonce=st.nonce,
            resources=[self.cache.packed(t, r) for r in resources],
            control_plane={"identifier": CONTROL_PLANE_ID})


class _DeltaStream(_Stream):
    kind = "delta"

    def on_request(self, req: discovery_pb2.DeltaDiscoveryRequest) -> Iterator[Any]:
        t = self.type_of(req)
        self.identify(req)
        first = t not in self.types
        st = self.types.setdefault(t, _TypeState())
        # The ACK/NACK part counts only against our latest nonce; the
        # subscription part is honoured whatever the nonce (the protocol says so).
        self.ack_or_nack(t, st, req, st.version)
        if req.response_nonce and req.response_nonce != st.nonce:
            log.debug("xDS delta stream %d: stale nonce %r for %s (latest %s)", self.id,
                      req.response_nonce, _short(t), st.nonce)
        self._subscribe(t, st, req, first)
        resp = self.respond(t, st, force=first)
        if resp is not None:
            yield resp

    def _subscribe(self, t: str, st: _TypeState, req: discovery_pb2.DeltaDiscoveryRequest,
                   first: bool) -> None:
        sub_names = set(req.resource_names_subscribe)
        unsub_names = set(req.resource_names_unsubscribe)
        wildcard = st.sub.wildcard
        if WILDCARD in sub_names:
            wildcard = True
        elif first and not sub_names and not unsub_names and t in GLOBAL_TYPES:
            wildcard = True  # legacy wildcard
        if WILDCARD in unsub_names:
            wildcard = False
        sub_names.discard(WILDCARD)
        unsub_names.discard(WILDCARD)
        names = (set(st.sub.names) | sub_names) - unsub_names
        if first:
            # Reconnect: what the client already holds is not sent again.
            st.sent = dict(req.initial_resource_versions)
            st.forced |= {n for n in sub_names if n not in st.sent}
        else:
            for n in sub_names:
                st.sent.pop(n, None)  # must be (re)sent even if we think it is there
                st.forced.add(n)
        st.sub = Subscription(wildcard, frozenset(names))
        for n in unsub_names:
            if wildcard:
                st.forced.add(n)  # still covered by "*": tell the client what is true
            else:
                st.sent.pop(n, None)
                st.forced.discard(n)
        if not wildcard:
            for n in [n for n in st.sent if n not in names]:
                del st.sent[n]  # "*" dropped: the client keeps only what it named

    def respond(self, t: str, st: _TypeState, force: bool,
                candidates: frozenset[str] | None = None
                ) -> discovery_pb2.DeltaDiscoveryResponse | None:
        change = delta(self.snapshot, t, st.sub, st.sent, st.forced, candidates)
        st.forced.clear()
        if not change and not force:
            return None
        for r in change.resources:
            st.sent[r.name] = r.version
        for n in change.removed:
            st.sent.pop(n, None)
        st.nonce, st.version = self.next_nonce(), self.snapshot.type_version(t)
        log.debug("xDS delta stream %d -> %s: %s %d resources, %d removed (nonce %s)", self.id,
                  self.who, _short(t), len(change.resources), len(change.removed), st.nonce)
        return discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=st.version, type_url=t, nonce=st.nonce,
            resources=[discovery_pb2.Resource(name=r.name, version=r.version,
                                              resource=self.cache.packed(t, r))
                       for r in change.resources],
            removed_resources=list(change.removed),
            control_plane={"identifier": CONTROL_PLANE_ID})


class AdsServer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """Serves the cache's snapshot over ADS, both protocol variants."""

    def __init__(self, cache: SnapshotCache) -> None:
        self.cache = cache
        self._ids = itertools.count(1)

    async def StreamAggregatedResources(  # noqa: N802 (the gRPC method name)
            self, request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
            context: grpc.aio.ServicerContext) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        stream = _SotwStream(self.cache, next(self._ids), context.peer())
        async for resp in stream.run(request_iterator, context):
            yield resp

    async def DeltaAggregatedResources(  # noqa: N802 (the gRPC method name)
            self, request_iterator: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
            context: grpc.aio.ServicerContext
    ) -> AsyncIterator[discovery_pb2.DeltaDiscoveryResponse]:
        stream = _DeltaStream(self.cache, next(self._ids), context.peer())
        async for resp in stream.run(request_iterator, context):
            yield resp


def add_to_server(server: grpc.aio.Server, cache: SnapshotCache) -> AdsServer:
    servicer = AdsServer(cache)
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(servicer, server)
    return servicer
