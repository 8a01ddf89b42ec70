"""The agent's xDS client: ADS over gRPC, incremental (delta) by default,
state of the world for control planes without delta.

Every response is validated as a whole (``to_service_table``) before anything
changes: a usable one is ACKed, applied atomically to the proxy and the BPF
service map, and persisted; an unusable one is NACKed with the reason and
the last good config keeps serving. Lost streams are retried with jittered
exponential backoff.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2

from agent.config_store import ConfigStore
from agent.xds_state import Record, Rejected, XdsConfig, name_of, to_service_table, unpack
from controlplane import naming
from dataplane.services import ServiceTable

log = logging.getLogger("nodemesh.xds")

WILDCARD_TYPES = (naming.CLUSTER, naming.LISTENER)
INVALID_ARGUMENT = 3
BACKOFF_BASE = 0.2
BACKOFF_CAP = 10.0

Apply = Callable[[XdsConfig, ServiceTable], None]


class _Fallback(Exception):
    """The control plane does not implement delta ADS."""


async def _requests(queue: asyncio.Queue[Any]) -> AsyncIterator[Any]:
    while True:
        item = await queue.get()
        if item is None:
            return
        yield item


class XdsClient:
    def __init__(self, address: str, node: base_pb2.Node, apply: Apply,
                 store: ConfigStore | None = None, mode: str = "delta") -> None:
        self.address = address
        self.node = node
        self._apply = apply
        self.store = store
        self.mode = mode
        self.config = XdsConfig()
        self.source = "none"  # none | persisted | control-plane
        self.connected = False
        self.last_error: str | None = None
        self.accepted = 0
        self.rejected = 0
        self.last: dict[str, dict[str, Any]] = {}
        self._acked_this_stream: set[str] = set()
        self.synced = asyncio.Event()

    # -- persisted config ------------------------------------------------------
    def load_persisted(self) -> bool:
        if self.store is None:
            return False
        config = self.store.load()
        if config is None:
            return False
        try:
            table = to_service_table(config)
        except Rejected as exc:
            log.error("ignoring the persisted config %s: %s", self.store.path, exc)
            return False
        self.config = config
        self.source = "persisted"
        self._apply(config, table)
        log.info("serving the persisted config from %s until the control plane answers "
                 "(%d listeners, %d clusters)", self.store.path,
                 len(config.of(naming.LISTENER)), len(config.of(naming.CLUSTER)))
        return True

    # -- the connection loop -------------------------------------------------------
    async def run(self) -> None:
        attempt = 0
        while True:
            progressed = False
            channel = grpc.aio.insecure_channel(self.address)
            try:
                self._acked_this_stream = set()
                if self.mode == "delta":
                    progressed = await self._delta(channel)
                else:
                    progressed = await self._sotw(channel)
                self.last_error = "the control plane closed the stream"
            except _Fallback:
                log.warning("xDS: %s does not implement delta ADS; using state of the world",
                            self.address)
                self.mode = "sotw"
                await channel.close()
                continue
            except grpc.aio.AioRpcError as exc:
                detail = (exc.details() or "").splitlines()[0] if exc.details() else ""
                self.last_error = f"{exc.code().name}: {detail}"
            except asyncio.CancelledError:
                await channel.close()
                raise
            finally:
                self.connected = False
            await channel.close()
            attempt = 0 if progressed else attempt + 1
            delay = random.uniform(BACKOFF_BASE, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** attempt))
            log.warning("xDS: control plane %s: %s; keeping the last good config (%s), "
                        "retrying in %.1fs", self.address, self.last_error, self.source, delay)
            await asyncio.sleep(delay)

    def _record(self, type_url: str, status: str, nonce: str, version: str,
                reason: str | None = None) -> None:
        self.last[type_url] = {"status": status, "nonce": nonce, "version": version,
                               "reason": reason, "at": time.time()}

    def _check_synced(self, subscribed: dict[str, set[str]]) -> None:
        if self.synced.is_set():
            return
        if all(t in self._acked_this_stream or not subscribed.get(t) for t in naming.TYPE_ORDER):
            self.synced.set()

    def _accept(self, candidate: XdsConfig, table: ServiceTable) -> None:
        self.config = candidate
        self.source = "control-plane"
        self.accepted += 1
        self._apply(candidate, table)
        if self.store is not None:
            try:
                self.store.save(candidate)
            except OSError as exc:
                log.error("cannot persist the xDS config to %s: %s", self.store.path, exc.strerror)

    def _nack(self, type_url: str, nonce: str, reason: str) -> status_pb2.Status:
        self.rejected += 1
        log.error("xDS: rejected %s (nonce %s): %s; keeping the last good config",
                  naming.SHORT.get(type_url, type_url), nonce, reason)
        self._record(type_url, "NACK", nonce, self.config.type_version(type_url), reason)
        return status_pb2.Status(code=INVALID_ARGUMENT, message=reason)

    # -- incremental ---------------------------------------------------------------
    async def _delta(self, channel: grpc.aio.Channel) -> bool:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        out: asyncio.Queue[Any] = asyncio.Queue()
        call = stub.DeltaAggregatedResources(_requests(out))
        subscribed: dict[str, set[str]] = {t: set() for t in naming.TYPE_ORDER}
        progressed = False
        first = True

        def subscribe(type_url: str, names: set[str]) -> None:
            nonlocal first
            new, gone = names - subscribed[type_url], subscribed[type_url] - names
            if not new and not gone:
                return
            req = discovery_pb2.DeltaDiscoveryRequest(
                type_url=type_url, resource_names_subscribe=sorted(new),
                resource_names_unsubscribe=sorted(gone))
            if not subscribed[type_url]:
                # First request for this type on this stream: tell the server
                # what we already hold so it sends only what changed.
                req.initial_resource_versions.update(
                    {n: r.version for n, r in self.config.of(type_url).items()})
            if first:
                req.node.CopyFrom(self.node)
                first = False
            subscribed[type_url] = set(names)
            out.put_nowait(req)

        def resubscribe() -> None:
            subscribe(naming.ENDPOINT, self.config.eds_names())
            subscribe(naming.ROUTE, self.config.rds_names())

        for t in WILDCARD_TYPES:
            subscribe(t, {"*"})
        resubscribe()
        try:
            while True:
                try:
                    resp = await call.read()
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.UNIMPLEMENTED and not progressed:
                        raise _Fallback from None
                    raise
                if resp is grpc.aio.EOF:
                    return progressed
                self.connected = True
                progressed = True
                t = resp.type_url
                ack = discovery_pb2.DeltaDiscoveryRequest(type_url=t, response_nonce=resp.nonce)
                try:
                    candidate, table = await asyncio.to_thread(
                        _delta_candidate, self.config, t, list(resp.resources),
                        list(resp.removed_resources))
                except Rejected as exc:
                    ack.error_detail.CopyFrom(self._nack(t, resp.nonce, str(exc)))
                    out.put_nowait(ack)
                    continue
                self._accept(candidate, table)
                self._record(t, "ACK", resp.nonce, candidate.type_version(t))
                self._acked_this_stream.add(t)
                out.put_nowait(ack)
                # Drop what we no longer subscribe to, then follow the new names.
                for dep, names in ((naming.ENDPOINT, self.config.eds_names()),
                                   (naming.ROUTE, self.config.rds_names())):
                    stale = set(self.config.of(dep)) - names
                    if stale:
                        self.config = self.config.changed(dep, [], stale)
                resubscribe()
                self._check_synced(subscribed)
        finally:
            out.put_nowait(None)
            call.cancel()

    # -- state of the world ----------------------------------------------------------
    async def _sotw(self, channel: grpc.aio.Channel) -> bool:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        out: asyncio.Queue[Any] = asyncio.Queue()
        call = stub.StreamAggregatedResources(_requests(out))
        names: dict[str, list[str]] = {naming.CLUSTER: [], naming.LISTENER: []}
        nonces: dict[str, str] = {}
        progressed = False
        first = True

        def request(type_url: str, error: status_pb2.Status | None = None,
                    version: str | None = None) -> None:
            nonlocal first
            req = discovery_pb2.DiscoveryRequest(
                type_url=type_url, resource_names=names.get(type_url, []),
                version_info=version if version is not None
                else self.config.version_info.get(type_url, ""),
                response_nonce=nonces.get(type_url, ""))
            if error is not None:
                req.error_detail.CopyFrom(error)
            if first:
                req.node.CopyFrom(self.node)
                first = False
            out.put_nowait(req)

        def follow(type_url: str, wanted: set[str]) -> None:
            if type_url in names and set(names[type_url]) == wanted:
                return
            if not wanted and type_url not in names:
                return  # never subscribe with an empty list: that would mean everything
            names[type_url] = sorted(wanted)
            request(type_url)

        for t in WILDCARD_TYPES:
            request(t)
        follow(naming.ENDPOINT, self.config.eds_names())
        follow(naming.ROUTE, self.config.rds_names())
        try:
            while True:
                resp = await call.read()
                if resp is grpc.aio.EOF:
                    return progressed
                self.connected = True
                progressed = True
                t = resp.type_url
                nonces[t] = resp.nonce
                try:
                    candidate, table = await asyncio.to_thread(
                        _sotw_candidate, self.config, t, list(resp.resources), resp.version_info)
                except Rejected as exc:
                    request(t, self._nack(t, resp.nonce, str(exc)))
                    continue
                self._accept(candidate, table)
                self._record(t, "ACK", resp.nonce, resp.version_info)
                self._acked_this_stream.add(t)
                request(t, version=resp.version_info)
                follow(naming.ENDPOINT, self.config.eds_names())
                follow(naming.ROUTE, self.config.rds_names())
                self._check_synced({k: set(v) for k, v in names.items()})
        finally:
            out.put_nowait(None)
            call.cancel()

    # -- inspection -----------------------------------------------------------------
    def dump(self) -> dict[str, Any]:
        resources = self.config.dump()
        types = {}
        for t in naming.TYPE_ORDER:
            short = naming.SHORT[t]
            types[short] = {"type_url": t, "version": self.config.type_version(t),
                            "last": self.last.get(t), "count": len(resources[short]),
                            "resources": resources[short]}
        return {"control_plane": self.address, "mode": self.mode, "connected": self.connected,
                "synced": self.synced.is_set(), "source": self.source,
                "last_error": self.last_error, "accepted": self.accepted,
                "rejected": self.rejected, "node": self.node.id, "types": types}


# Validating a response means decoding it and building the whole service table: for
# thousands of services that is seconds of Python, so it runs in a worker thread and
# the proxy's event loop keeps serving meanwhile (responses are still handled one at
# a time, in order: the coroutine awaits each before reading the next).
def _delta_candidate(config: XdsConfig, type_url: str, resources: list[Any],
                     removed: list[str]) -> tuple[XdsConfig, ServiceTable]:
    upserts = [Record(r.name, r.version, r.resource) for r in resources]
    for r in upserts:
        unpack(type_url, r.resource)
    candidate = config.changed(type_url, upserts, removed)
    return candidate, to_service_table(candidate)


def _sotw_candidate(config: XdsConfig, type_url: str, resources: list[Any],
                    version: str) -> tuple[XdsConfig, ServiceTable]:
    records = [Record(name_of(type_url, msg), version, packed)
               for packed in resources for msg in (unpack(type_url, packed),)]
    candidate = config.replaced(type_url, records, version)
    return candidate, to_service_table(candidate)
