"""xDS control plane benchmark (issue 3): initial sync and update fan-out to
many simulated delta ADS clients, and the time from a YAML edit to the BPF
service map of a real agent.

  sudo .venv/bin/python -m bench.xds_bench            # 1,000 services / 10,000 endpoints, 50 clients
  sudo .venv/bin/python -m bench.xds_bench --quick    # 100 / 1,000 / 10 clients, a smoke run

Phase 1 (no root needed): a folder of Kubernetes-style YAML (one file per
Service and per EndpointSlice; clusterIPs in 198.19.0.0/16, endpoint IPs in
198.18.0.0/16, configured and never contacted) is served by a control plane
started in this process (``controlplane.service.serve`` on 127.0.0.1, an
ephemeral port). K lightweight delta ADS clients (grpc.aio, one channel and
TCP connection each) subscribe with wildcard CDS+LDS, then EDS/RDS for the
names those carry, ACKing every response. Then U times one EndpointSlice file
is edited (an endpoint added or removed) and every client's arrival time of
that EDS update is recorded, along with the size of every response sent after
the initial sync (an update must carry only the changed resource).

Phase 2 (root): the sandbox node of the demo and the tests (``Scenario``),
its agent with the embedded control plane watching the manifests folder. R
times a Service (plus its EndpointSlice, one file) is added and then removed,
and the agent's pinned ``nm_services`` map is polled every ~1 ms, read-only
(a BPF_F_RDONLY fd from BPF_OBJ_GET, lookups only), until the VIP appears or
disappears. Measured on the scenario as it is, then again after loading the
same N services / M endpoints as phase 1 into the folder.

Results: bench/results/<YYYY-MM-DD>-<hostname>/xds.json and xds.md
(xds-quick.* for --quick, so a smoke run never replaces full numbers). Not
part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import datetime
import ipaddress
import json
import logging
import os
import platform
import random
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"

FULL = {"services": 1000, "endpoints": 10000, "clients": 50, "updates": 20, "bpf_edits": 10,
        "bpf_loaded_edits": 3}
QUICK = {"services": 100, "endpoints": 1000, "clients": 10, "updates": 5, "bpf_edits": 3,
         "bpf_loaded_edits": 2}

VIP_BASE = ipaddress.IPv4Address("198.19.1.0")  # the sandbox scenario uses 198.19.0.10/11
PROBE_VIP_BASE = ipaddress.IPv4Address("198.19.250.1")
EP_BASE = ipaddress.IPv4Address("198.18.1.0")  # outside the sandbox pod subnet 198.18.0.0/24
VIP_NET = ipaddress.IPv4Network("198.19.0.0/16")
EP_NET = ipaddress.IPv4Network("198.18.0.0/16")
NAMESPACES = 10
BENCH_NS = "xdsbench"

SYNC_TIMEOUT = 180.0  # all clients to full sync
UPDATE_TIMEOUT = 30.0  # one update to reach every client
SETTLE = 0.3  # after the last update: catch stray responses
BPF_TIMEOUT = 30.0  # one edit to show in the BPF map
BULK_TIMEOUT = 180.0  # N services to show in the BPF map
MAP_POLL = 0.001
# Edits start at a random phase of the folder poll (0..POLL_PHASE s after the
# previous result), so latencies are not phase-locked to the poll timer.
POLL_PHASE = 0.25
JITTER = random.Random(20240903)

log = logging.getLogger("bench.xds")


class BenchError(Exception):
    """A usage or environment problem: exit 2 with one line."""


# -- numbers ----------------------------------------------------------------------


def pct(values: list[float], q: float) -> float | None:
    """Percentile with linear interpolation (q in 0..100); None for no values."""
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def summary_ms(values_s: list[float]) -> dict[str, Any]:
    ms = [x * 1000 for x in values_s]
    r = lambda x: None if x is None else round(x, 2)  # noqa: E731
    return {"n": len(ms), "p50_ms": r(pct(ms, 50)), "p95_ms": r(pct(ms, 95)),
            "max_ms": r(max(ms) if ms else None), "min_ms": r(min(ms) if ms else None),
            "mean_ms": r(sum(ms) / len(ms) if ms else None)}


# -- the YAML folder ------------------------------------------------------------------


@dataclass
class ServiceSpec:
    index: int
    namespace: str
    name: str
    vip: str
    http: bool
    endpoints: list[str] = field(default_factory=list)

    @property
    def port(self) -> int:
        return 80 if self.http else 5432

    @property
    def port_name(self) -> str:
        return "http" if self.http else "tcp-db"

    @property
    def target(self) -> int:
        return 8080 if self.http else 5432

    @property
    def cluster(self) -> str:
        from controlplane import naming

        return naming.cluster_name(self.name, self.namespace, self.port)


def plan(services: int, endpoints: int, prefix: str = "svc") -> list[ServiceSpec]:
    """N services (3 of 4 HTTP, so routes exist; 1 of 4 opaque TCP) sharing M
    endpoints as evenly as possible."""
    if services < 1 or endpoints < 0:
        raise BenchError("--services must be >= 1 and --endpoints >= 0")
    if int(VIP_BASE) + services >= int(VIP_NET.broadcast_address):
        raise BenchError(f"--services {services} does not fit in {VIP_NET}")
    if int(EP_BASE) + endpoints + 10_000 >= int(EP_NET.broadcast_address):
        raise BenchError(f"--endpoints {endpoints} does not fit in {EP_NET}")
    out = []
    next_ep = int(EP_BASE)
    base, extra = divmod(endpoints, services)
    for i in range(services):
        spec = ServiceSpec(i, f"{BENCH_NS}-{i % NAMESPACES:02d}", f"{prefix}-{i:05d}",
                           str(ipaddress.IPv4Address(int(VIP_BASE) + i)), http=i % 4 != 3)
        for _ in range(base + (1 if i < extra else 0)):
            spec.endpoints.append(str(ipaddress.IPv4Address(next_ep)))
            next_ep += 1
        out.append(spec)
    return out


def service_doc(s: ServiceSpec) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": s.name, "namespace": s.namespace},
            "spec": {"clusterIP": s.vip, "ports": [{"name": s.port_name, "port": s.port,
                                                    "targetPort": s.target, "protocol": "TCP"}]}}


def slice_doc(s: ServiceSpec) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{s.name}-1", "namespace": s.namespace,
                         "labels": {"kubernetes.io/service-name": s.name}},
            "addressType": "IPv4",
            "ports": [{"name": s.port_name, "port": s.target, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}}
                          for ip in s.endpoints]}


def write_yaml(path: Path, docs: list[dict[str, Any]]) -> None:
    """Atomically, as config management does (a dot-file is never read)."""
    import yaml

    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    os.replace(tmp, path)


def slice_file(directory: Path, s: ServiceSpec) -> Path:
    return directory / f"eps-{s.namespace}-{s.name}.yaml"


def write_folder(directory: Path, specs: list[ServiceSpec]) -> int:
    """One file per Namespace, Service and EndpointSlice; the number of files."""
    n = 0
    for ns in sorted({s.namespace for s in specs}):
        write_yaml(directory / f"ns-{ns}.yaml", [{"apiVersion": "v1", "kind": "Namespace",
                                                  "metadata": {"name": ns}}])
        n += 1
    for s in specs:
        write_yaml(directory / f"svc-{s.namespace}-{s.name}.yaml", [service_doc(s)])
        write_yaml(slice_file(directory, s), [slice_doc(s)])
        n += 2
    return n


# -- phase 1: simulated delta clients -------------------------------------------------


def _type_urls() -> tuple[str, str, str, str]:
    from controlplane import naming

    return naming.CLUSTER, naming.ENDPOINT, naming.LISTENER, naming.ROUTE


async def _requests(queue: asyncio.Queue[Any]) -> AsyncIterator[Any]:
    while True:
        item = await queue.get()
        if item is None:
            return
        yield item


def _route_names(listener_bytes: bytes) -> set[str]:
    """RDS names a Listener refers to (its HCMs, API listener included)."""
    from envoy.config.listener.v3 import listener_pb2
    from envoy.extensions.filters.network.http_connection_manager.v3 import (
        http_connection_manager_pb2 as hcm_pb2,
    )

    lis = listener_pb2.Listener.FromString(listener_bytes)
    anys = [f.typed_config for fc in lis.filter_chains for f in fc.filters]
    if lis.HasField("api_listener"):
        anys.append(lis.api_listener.api_listener)
    out = set()
    for a in anys:
        if a.type_url.endswith("HttpConnectionManager"):
            hcm = hcm_pb2.HttpConnectionManager.FromString(a.value)
            if hcm.HasField("rds"):
                out.add(hcm.rds.route_config_name)
    return out


def _eds_name(cluster_bytes: bytes) -> str | None:
    from envoy.config.cluster.v3 import cluster_pb2

    c = cluster_pb2.Cluster.FromString(cluster_bytes)
    if c.type != cluster_pb2.Cluster.EDS:
        return None
    return c.eds_cluster_config.service_name or c.name


@dataclass
class Response:
    at: float
    type_url: str
    resources: int
    removed: int
    names: tuple[str, ...]


class SimClient:
    """One delta ADS stream, as a node's agent would hold it, minus validation
    and applying: names and versions are tracked, EDS/RDS follow CDS/LDS, every
    response is ACKed."""

    def __init__(self, index: int, address: str, bench: FanoutBench) -> None:
        self.index = index
        self.address = address
        self.bench = bench
        self.node_id = f"xdsbench-{index:03d}"
        self.held: dict[str, dict[str, str]] = {t: {} for t in _type_urls()}
        self.eds_of: dict[str, str] = {}  # cluster name -> EDS service name
        self.routes_of: dict[str, set[str]] = {}  # listener name -> route names
        self.subscribed: dict[str, set[str]] = {t: set() for t in _type_urls()}
        self.acked: set[str] = set()
        self.started: float | None = None
        self.synced_at: float | None = None
        self.synced = asyncio.Event()
        self.after_sync: list[Response] = []
        self.error: str | None = None
        self.nonces_acked = 0
        self._out: asyncio.Queue[Any] = asyncio.Queue()
        self._first = True

    def _send(self, req: Any) -> None:
        if self._first:
            req.node.id = self.node_id
            req.node.cluster = "xdsbench"
            self._first = False
        self._out.put_nowait(req)

    def _subscribe(self, type_url: str, wanted: set[str]) -> None:
        from envoy.service.discovery.v3 import discovery_pb2

        have = self.subscribed[type_url]
        new, gone = wanted - have, have - wanted
        if not new and not gone:
            return
        self.subscribed[type_url] = set(wanted)
        self._send(discovery_pb2.DeltaDiscoveryRequest(
            type_url=type_url, resource_names_subscribe=sorted(new),
            resource_names_unsubscribe=sorted(gone)))

    async def run(self) -> None:
        import grpc
        from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

        cds, eds, lds, rds = _type_urls()
        options = [("grpc.use_local_subchannel_pool", 1),  # its own TCP connection
                   ("grpc.max_receive_message_length", 256 * 1024 * 1024)]
        channel = grpc.aio.insecure_channel(self.address, options=options)
        call = None
        try:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            self.started = time.monotonic()
            call = stub.DeltaAggregatedResources(_requests(self._out))
            for t in (cds, lds):
                self._send(discovery_pb2.DeltaDiscoveryRequest(
                    type_url=t, resource_names_subscribe=["*"]))
                self.subscribed[t] = {"*"}
            while True:
                resp = await call.read()
                if resp is grpc.aio.EOF:
                    self.error = self.error or "the control plane closed the stream"
                    return
                now = time.monotonic()
                self._on_response(resp, now)
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as exc:
            self.error = f"{exc.code().name}: {exc.details()}"
        except Exception as exc:  # noqa: BLE001 - reported per client, never swallowed silently
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self._out.put_nowait(None)
            if call is not None:
                call.cancel()
            await channel.close(grace=None)

    def _on_response(self, resp: Any, now: float) -> None:
        from envoy.service.discovery.v3 import discovery_pb2

        cds, eds, lds, rds = _type_urls()
        t = resp.type_url
        held = self.held.setdefault(t, {})
        names = tuple(r.name for r in resp.resources)
        for r in resp.resources:
            held[r.name] = r.version
            if t == cds:
                name = _eds_name(r.resource.value)
                if name is None:
                    self.eds_of.pop(r.name, None)
                else:
                    self.eds_of[r.name] = name
            elif t == lds:
                self.routes_of[r.name] = _route_names(r.resource.value)
        for n in resp.removed_resources:
            held.pop(n, None)
            if t == cds:
                self.eds_of.pop(n, None)
            elif t == lds:
                self.routes_of.pop(n, None)
        self._send(discovery_pb2.DeltaDiscoveryRequest(type_url=t, response_nonce=resp.nonce))
        self.nonces_acked += 1
        self.acked.add(t)
        if t == cds:
            self._subscribe(eds, set(self.eds_of.values()))
        elif t == lds:
            self._subscribe(rds, set().union(*self.routes_of.values()) if self.routes_of else set())
        if self.synced_at is None:
            if self._complete():
                self.synced_at = now
                self.synced.set()
        else:
            self.after_sync.append(Response(now, t, len(resp.resources),
                                            len(resp.removed_resources), names))
            if t == eds:
                self.bench.on_eds(self, names, now)

    def _complete(self) -> bool:
        cds, eds, lds, rds = _type_urls()
        if not {cds, lds} <= self.acked:
            return False
        for t in (eds, rds):
            wanted = self.subscribed[t]
            if wanted and (t not in self.acked or not wanted <= self.held[t].keys()):
                return False
        return True


class FanoutBench:
    """Phase 1: a control plane in this process and K simulated clients."""

    def __init__(self, args: argparse.Namespace, say: Callable[[str], None]) -> None:
        self.args = args
        self.say = say
        self.result: dict[str, Any] = {}
        self.cp: Any = None
        self.generations: dict[int, float] = {}  # generation -> installed at (monotonic)
        self.polls: list[tuple[float, float, bool]] = []  # (start, end, installed)
        self.reads: list[tuple[float, float]] = []  # the YAML source's re-reads (start, end)
        self._watch: dict[str, tuple[int, float]] = {}  # EDS name -> (update, written at)
        self.arrivals: dict[int, dict[int, float]] = {}  # update -> client -> latency s
        self._all_in = asyncio.Event()
        self.clients: list[SimClient] = []

    def on_eds(self, client: SimClient, names: tuple[str, ...], now: float) -> None:
        for n in names:
            hit = self._watch.get(n)
            if hit is None:
                continue
            u, t0 = hit
            got = self.arrivals.setdefault(u, {})
            got.setdefault(client.index, now - t0)
            if len(got) == len(self.clients):
                self._all_in.set()

    def _instrument(self, cp: Any) -> None:
        """Timestamps of snapshot installs and folder polls (bench-side wrappers on
        this instance only; nothing in the control plane changes)."""
        self.cp = cp
        cache = cp.cache
        set_snapshot = cache.set_snapshot
        poll = cp.poll
        source_poll = cp.source.poll

        def timed_set_snapshot(snapshot: Any) -> int:
            g = set_snapshot(snapshot)
            self.generations[g] = time.monotonic()
            return g

        def timed_poll(strict: bool = False) -> bool:
            t0 = time.monotonic()
            installed = poll(strict)
            self.polls.append((t0, time.monotonic(), installed))
            return installed

        def timed_source_poll() -> bool:
            t0 = time.monotonic()
            changed = source_poll()
            if changed:
                self.reads.append((t0, time.monotonic()))
            return changed

        cache.set_snapshot = timed_set_snapshot
        cp.poll = timed_poll
        cp.source.poll = timed_source_poll

    async def run(self, workdir: Path) -> dict[str, Any]:
        from controlplane import naming
        from controlplane.service import serve

        a = self.args
        specs = plan(a.services, a.endpoints)
        folder = workdir / "config"
        folder.mkdir()
        t = time.monotonic()
        files = write_folder(folder, specs)
        self.say(f"phase 1: wrote {files} YAML files ({a.services} services, {a.endpoints} "
                 f"endpoints) in {time.monotonic() - t:.1f}s")
        res: dict[str, Any] = {"files": files, "folder_bytes": sum(
            p.stat().st_size for p in folder.iterdir())}
        self.result = res

        ready: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def on_ready(cp: Any) -> None:
            self._instrument(cp)
            if not ready.done():
                ready.set_result(cp)

        stop = asyncio.Event()
        t_load = time.monotonic()
        server = asyncio.create_task(serve(folder, "127.0.0.1:0", a.poll_interval, stop=stop,
                                           on_ready=on_ready))
        tasks: list[asyncio.Task[Any]] = []
        try:
            done, _ = await asyncio.wait({server, ready}, timeout=120,
                                         return_when=asyncio.FIRST_COMPLETED)
            if server in done:
                server.result()  # raises what stopped it
                raise BenchError("the control plane stopped before serving")
            if ready not in done:
                raise BenchError("the control plane did not start within 120 s")
            cp = ready.result()
            snap = cp.cache.snapshot
            counts = {naming.SHORT[t]: len(snap.of(t)) for t in naming.TYPE_ORDER}
            res["control_plane_load_s"] = round(time.monotonic() - t_load, 3)
            res["resources"] = counts
            res["listen"] = f"127.0.0.1:{cp.port}"
            res["poll_interval_s"] = a.poll_interval
            if cp.source.problems:
                raise BenchError(f"the generated folder has problems: {cp.source.problems[0]}")
            if counts["clusters"] != a.services:
                raise BenchError(f"expected {a.services} clusters, the snapshot has {counts}")
            self.say(f"phase 1: control plane on 127.0.0.1:{cp.port} loaded the folder in "
                     f"{res['control_plane_load_s']:.2f}s: {counts}")

            # -- initial sync ---------------------------------------------------------
            address = f"127.0.0.1:{cp.port}"
            self.clients = [SimClient(i, address, self) for i in range(a.clients)]
            t_sync = time.monotonic()
            tasks = [asyncio.create_task(c.run()) for c in self.clients]
            waiters = [asyncio.create_task(c.synced.wait()) for c in self.clients]
            deadline = t_sync + SYNC_TIMEOUT
            pending = set(waiters)
            while pending and time.monotonic() < deadline:
                _, pending = await asyncio.wait(
                    pending, timeout=min(1.0, max(0.01, deadline - time.monotonic())))
                if all(tk.done() for c, tk in zip(self.clients, tasks, strict=True)
                       if not c.synced.is_set()):
                    break  # whoever is not in sync has ended: waiting longer is pointless
            for w in waiters:
                w.cancel()
            synced = [c for c in self.clients if c.synced_at is not None]
            sync_all = (max(c.synced_at for c in synced) - t_sync  # type: ignore[type-var]
                        if synced else time.monotonic() - t_sync)
            per_client = [c.synced_at - c.started for c in synced]  # type: ignore[operator]
            expected = {naming.SHORT[t]: len(snap.of(t)) for t in naming.TYPE_ORDER}
            mismatched = [c.index for c in synced
                          if {naming.SHORT[t]: len(c.held[t]) for t in naming.TYPE_ORDER} != expected]
            res["initial_sync"] = {
                **summary_ms(per_client),
                "clients": a.clients, "synced": len(synced),
                "all_synced_s": round(sync_all, 3) if len(synced) == a.clients else None,
                "clients_with_wrong_counts": mismatched,
                "errors": sorted({c.error for c in self.clients if c.error})[:5],
            }
            self.say(f"phase 1: {len(synced)}/{a.clients} clients in full sync; "
                     f"per client p50 {res['initial_sync']['p50_ms']} ms, max "
                     f"{res['initial_sync']['max_ms']} ms; all in {sync_all:.2f}s")
            if len(synced) != a.clients:
                raise BenchError(f"only {len(synced)} of {a.clients} clients reached full sync "
                                 f"in {SYNC_TIMEOUT:.0f}s: {res['initial_sync']['errors']}")

            # -- update fan-out ---------------------------------------------------------
            await asyncio.sleep(SETTLE)
            for c in self.clients:
                c.after_sync.clear()
            res["fanout"] = await self._updates(folder, specs)
            await asyncio.sleep(SETTLE)
            res["update_responses"] = self._response_sizes()
            acks = sum(sum(r.acks.values()) for r in cp.cache.clients.values()
                       if r.node_id.startswith("xdsbench-"))
            nacks = sum(r.nack_total for r in cp.cache.clients.values())
            res["server_accounts"] = {"acks_recorded": acks, "nacks": nacks,
                                      "acks_sent_by_clients": sum(c.nonces_acked
                                                                  for c in self.clients)}
            res["process_max_rss_mib"] = round(
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
            return res
        finally:
            for tk in tasks:
                tk.cancel()
            for tk in tasks:
                with contextlib.suppress(BaseException):
                    await tk
            stop.set()
            try:
                await asyncio.wait_for(asyncio.shield(server), 10)
            except BaseException:  # noqa: BLE001 - stopping: report nothing, leave nothing
                server.cancel()
                with contextlib.suppress(BaseException):
                    await server

    async def _updates(self, folder: Path, specs: list[ServiceSpec]) -> dict[str, Any]:
        a = self.args
        latencies: list[float] = []
        rows = []
        missing = 0
        next_ip = int(EP_BASE) + a.endpoints + 1
        added: dict[int, str] = {}
        for u in range(a.updates):
            # Alternate: add an endpoint to a service, then remove it again from
            # the same one (two edits per service; services spread over the set).
            s = specs[(u // 2 * 7919) % len(specs)]
            if u % 2 == 0 or s.index not in added:
                ip = str(ipaddress.IPv4Address(next_ip))
                next_ip += 1
                s.endpoints.append(ip)
                added[s.index] = ip
                action = "add"
            else:
                s.endpoints.remove(added.pop(s.index))
                action = "remove"
            eds_name = s.cluster
            await asyncio.sleep(JITTER.uniform(0.02, 0.02 + a.poll_interval))
            self._all_in = asyncio.Event()
            poll_mark, read_mark = len(self.polls), len(self.reads)
            gen_before = self.cp.cache.generation
            write_yaml(slice_file(folder, s), [slice_doc(s)])
            t0 = time.monotonic()
            self._watch = {eds_name: (u, t0)}
            try:
                await asyncio.wait_for(self._all_in.wait(), UPDATE_TIMEOUT)
            except TimeoutError:
                pass
            self._watch = {}
            got = self.arrivals.get(u, {})
            missing += len(self.clients) - len(got)
            vals = list(got.values())
            latencies += vals
            installed = [p for p in self.polls[poll_mark:] if p[2]]
            reads = self.reads[read_mark:]
            gen = self.cp.cache.generation
            snap_at = self.generations.get(gen_before + 1)
            row = {"update": u, "action": action, "cluster": eds_name,
                   "endpoints_after": len(s.endpoints), "clients": len(got),
                   "first_ms": round(min(vals) * 1000, 2) if vals else None,
                   "last_ms": round(max(vals) * 1000, 2) if vals else None,
                   "generations": gen - gen_before}
            if installed and snap_at is not None:
                p0, p1, _ = installed[0]
                row["poll_wait_ms"] = round((p0 - t0) * 1000, 2)
                row["reread_translate_ms"] = round((p1 - p0) * 1000, 2)
                if reads:
                    row["yaml_reread_ms"] = round((reads[0][1] - reads[0][0]) * 1000, 2)
                    row["translate_ms"] = round((p1 - reads[0][1]) * 1000, 2)
                row["snapshot_to_last_client_ms"] = (round((max(vals) - (snap_at - t0)) * 1000, 2)
                                                     if vals else None)
            rows.append(row)
            self.say(f"  update {u + 1}/{a.updates} ({action} an endpoint of {s.namespace}/"
                     f"{s.name}): {len(got)}/{len(self.clients)} clients, first "
                     f"{row['first_ms']} ms, last {row['last_ms']} ms")
        out = summary_ms(latencies)
        out.update({"updates": a.updates, "pairs_expected": a.updates * len(self.clients),
                    "pairs_missing": missing, "per_update": rows})
        for key in ("poll_wait_ms", "reread_translate_ms", "yaml_reread_ms", "translate_ms",
                    "snapshot_to_last_client_ms"):
            vals = [r[key] for r in rows if r.get(key) is not None]
            out[f"{key[:-3]}_p50_ms"] = round(pct(vals, 50), 2) if vals else None
        last = [r["last_ms"] for r in rows if r["last_ms"] is not None]
        out["last_client_p50_ms"] = round(pct(last, 50), 2) if last else None
        out["last_client_max_ms"] = round(max(last), 2) if last else None
        return out

    def _response_sizes(self) -> dict[str, Any]:
        from controlplane import naming

        by_type: Counter[str] = Counter()
        sizes: Counter[int] = Counter()
        removed = 0
        for c in self.clients:
            for r in c.after_sync:
                by_type[naming.SHORT.get(r.type_url, r.type_url)] += 1
                sizes[r.resources] += 1
                removed += r.removed
        total = sum(by_type.values())
        expected = self.args.updates * len(self.clients)
        return {"responses": total, "expected": expected, "by_type": dict(by_type),
                "resources_per_response": {str(k): v for k, v in sorted(sizes.items())},
                "max_resources_per_response": max(sizes) if sizes else None,
                "removed_names": removed,
                "only_changed_resource": (total == expected and set(sizes) == {1}
                                          and set(by_type) == {"endpoints"} and removed == 0)}


# -- phase 2: YAML edit -> BPF map -----------------------------------------------------

BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_GET = 7
BPF_F_RDONLY = 1 << 3
NR_BPF = {"x86_64": 321, "aarch64": 280}


class _ObjGet(ctypes.Structure):
    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32),
                ("file_flags", ctypes.c_uint32)]


class _MapElem(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("key", ctypes.c_uint64),
                ("value", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class ReadOnlyMap:
    """A pinned BPF hash map opened read-only (BPF_F_RDONLY): lookups and key
    walks only; the kernel refuses writes through this fd."""

    def __init__(self, path: Path, key_type: type[ctypes.Structure],
                 value_type: type[ctypes.Structure]) -> None:
        nr = NR_BPF.get(platform.machine())
        if nr is None:
            raise BenchError(f"no bpf() syscall number known for {platform.machine()}")
        self._nr = nr
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.syscall.restype = ctypes.c_long
        self.key_type, self.value_type = key_type, value_type
        cpath = ctypes.create_string_buffer(str(path).encode())
        attr = _ObjGet(pathname=ctypes.addressof(cpath), bpf_fd=0, file_flags=BPF_F_RDONLY)
        fd = self._bpf(BPF_OBJ_GET, attr)
        if fd < 0:
            raise BenchError(f"cannot open {path} read-only: {os.strerror(ctypes.get_errno())}")
        self.fd = fd
        self._value = value_type()

    def _bpf(self, cmd: int, attr: ctypes.Structure) -> int:
        return int(self._libc.syscall(ctypes.c_long(self._nr), ctypes.c_int(cmd),
                                      ctypes.byref(attr), ctypes.c_uint(ctypes.sizeof(attr))))

    def has(self, key: ctypes.Structure) -> bool:
        attr = _MapElem(map_fd=self.fd, key=ctypes.addressof(key),
                        value=ctypes.addressof(self._value))
        if self._bpf(BPF_MAP_LOOKUP_ELEM, attr) == 0:
            return True
        err = ctypes.get_errno()
        if err == 2:  # ENOENT
            return False
        raise OSError(err, f"bpf map lookup: {os.strerror(err)}")

    def count(self, limit: int = 1 << 20) -> int:
        n = 0
        key, nxt = self.key_type(), self.key_type()
        attr = _MapElem(map_fd=self.fd, key=0, value=ctypes.addressof(nxt))
        while n < limit:
            if self._bpf(BPF_MAP_GET_NEXT_KEY, attr) != 0:
                break
            n += 1
            ctypes.memmove(ctypes.addressof(key), ctypes.addressof(nxt), ctypes.sizeof(key))
            attr.key = ctypes.addressof(key)
        return n

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _wait_map(m: ReadOnlyMap, key: ctypes.Structure, present: bool, t0: float) -> float | None:
    """Seconds from ``t0`` until the key's presence is ``present``; None on timeout."""
    deadline = t0 + BPF_TIMEOUT
    while True:
        if m.has(key) == present:
            return time.monotonic() - t0
        if time.monotonic() > deadline:
            return None
        time.sleep(MAP_POLL)


def _probe_docs(r: int, pod_ips: list[str]) -> tuple[str, list[dict[str, Any]]]:
    vip = str(ipaddress.IPv4Address(int(PROBE_VIP_BASE) + r))
    s = ServiceSpec(r, BENCH_NS, f"probe-{r:03d}", vip, http=True, endpoints=pod_ips)
    return vip, [service_doc(s), slice_doc(s)]


def _edit_round(sc: Any, m: ReadOnlyMap, edits: int, label: str, say: Callable[[str], None],
                offset: int) -> dict[str, Any]:
    from agent.bpf_layout import SvcKey

    pod_ips = [w.ip for w in sc.webs]
    adds: list[float] = []
    removes: list[float] = []
    timeouts = 0
    for r in range(edits):
        vip, docs = _probe_docs(offset + r, pod_ips)
        key = SvcKey.of(vip, 80)
        path = sc.dir / f"svc-{BENCH_NS}-probe-{offset + r:03d}.yaml"
        if m.has(key):
            raise BenchError(f"probe VIP {vip} is already in the map")
        time.sleep(JITTER.uniform(0.02, 0.02 + POLL_PHASE))
        write_yaml(path, docs)
        t0 = time.monotonic()
        dt = _wait_map(m, key, True, t0)
        if dt is None:
            timeouts += 1
        else:
            adds.append(dt)
        time.sleep(JITTER.uniform(0.02, 0.02 + POLL_PHASE))
        path.unlink()
        t0 = time.monotonic()
        dt2 = _wait_map(m, key, False, t0)
        if dt2 is None:
            timeouts += 1
        else:
            removes.append(dt2)
        say(f"  {label} edit {r + 1}/{edits}: add {vip} -> in map "
            f"{'timeout' if dt is None else f'{dt * 1000:.1f} ms'}, remove -> gone "
            f"{'timeout' if dt2 is None else f'{dt2 * 1000:.1f} ms'}")
    return {"add": summary_ms(adds), "remove": summary_ms(removes),
            "both": summary_ms(adds + removes), "timeouts": timeouts}


def bpf_phase(args: argparse.Namespace, say: Callable[[str], None]) -> dict[str, Any]:
    from agent.bpf_layout import SvcKey, SvcVal
    from sandbox.node import Sandbox
    from sandbox.scenario import Scenario

    res: dict[str, Any] = {"edits": args.bpf_edits, "loaded_edits": args.bpf_loaded_edits,
                           "map_poll_interval_ms": MAP_POLL * 1000,
                           "probe": "one file: Service (HTTP port 80, VIP in 198.19.250.0/24) + "
                                    "EndpointSlice (the 3 web pods); added, then deleted"}
    with Sandbox() as sb:
        sc = Scenario(sb).build()
        t = time.monotonic()
        sc.start_agent(timeout=60)
        res["agent_ready_s"] = round(time.monotonic() - t, 2)
        say(f"phase 2: sandbox {sb.run_id} up, agent {sc.instance} ready in "
            f"{res['agent_ready_s']}s")
        pinned = Path("/sys/fs/bpf/nodemesh") / sc.instance / "nm_services"
        m = ReadOnlyMap(pinned, SvcKey, SvcVal)
        try:
            base = m.count()
            res["scenario"] = {"services_in_map": base,
                               **_edit_round(sc, m, args.bpf_edits, "scenario", say, 0)}
            if args.bpf_services > 0:
                specs = plan(args.bpf_services, args.bpf_endpoints, prefix="fill")
                t0 = time.monotonic()
                files = write_folder(sc.dir, specs)
                t_written = time.monotonic()
                want = base + len(specs)
                deadline = t0 + BULK_TIMEOUT
                n = m.count()
                while n < want and time.monotonic() < deadline:
                    time.sleep(0.02)
                    n = m.count()
                loaded = time.monotonic() - t0
                res["bulk_load"] = {"services": args.bpf_services,
                                    "endpoints": args.bpf_endpoints, "files": files,
                                    "write_s": round(t_written - t0, 3),
                                    "to_map_s": round(loaded, 3) if n >= want else None,
                                    "services_in_map": n}
                say(f"phase 2: {files} files ({args.bpf_services} services) written; "
                    f"{n}/{want} in the map after {loaded:.2f}s")
                if n < want:
                    raise BenchError(f"the BPF map had {n} of {want} services after "
                                     f"{BULK_TIMEOUT:.0f}s")
                time.sleep(1.0)  # let the agent's other pollers settle
                res["loaded"] = {"services_in_map": m.count(),
                                 **_edit_round(sc, m, args.bpf_loaded_edits,
                                               f"+{args.bpf_services} svc", say, 100)}
            status = sc.cli_json("status")
            res["agent_status"] = {k: status.get(k) for k in ("ready", "xds", "reloads")
                                   if k in status}
        finally:
            m.close()
            sc.stop_agent()
    return res


# -- machine facts, output -----------------------------------------------------------------


def machine_facts() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    cpu_model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    pkgs = {}
    for mod in ("grpcio", "protobuf", "PyYAML", "uvloop", "envoy-data-plane", "xds-protos"):
        try:
            pkgs[mod] = version(mod)
        except PackageNotFoundError:
            continue
    commit = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain",
                                "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        commit = head + ("+dirty" if dirty else "")
    return {"hostname": socket.gethostname(), "kernel": platform.release(),
            "cpu_count": os.cpu_count(), "cpu_model": cpu_model,
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(), "python_packages": pkgs,
            "nodemesh_commit": commit}


def _f(x: Any, unit: str = "") -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:,.1f}{unit}"
    return f"{x:,}{unit}" if isinstance(x, int) else f"{x}{unit}"


def render_md(r: dict[str, Any]) -> str:
    p = r["params"]
    mode = " — quick smoke run" if p.get("quick") else ""
    lines = [f"# xDS control plane benchmark ({r['date']}, {r['machine']['hostname']}){mode}", "",
             f"`{r['command']}`", "",
             f"{p['services']:,} services / {p['endpoints']:,} endpoints, {p['clients']} "
             f"simulated delta clients, {p['updates']} endpoint edits; folder poll every "
             f"{p['poll_interval']} s. Kernel {r['machine']['kernel']}, "
             f"{r['machine']['cpu_count']} CPUs, load {r['machine']['loadavg_at_start']} at "
             f"start, Python {r['machine']['python']}, grpcio "
             f"{r['machine']['python_packages'].get('grpcio', '?')}.", "",
             "| measurement | n | p50 | p95 | max |", "|---|---:|---:|---:|---:|"]
    cp = r.get("control_plane") or {}
    if "initial_sync" in cp:
        s = cp["initial_sync"]
        lines.append(f"| initial sync per client (stream open → CDS+EDS+LDS+RDS received and "
                     f"ACKed), {s['clients']} clients at once | {s['n']} | {_f(s['p50_ms'], ' ms')} | "
                     f"{_f(s['p95_ms'], ' ms')} | {_f(s['max_ms'], ' ms')} |")
    if "fanout" in cp:
        f = cp["fanout"]
        lines.append(f"| update fan-out (EndpointSlice file written → EDS update received), "
                     f"all (client, update) pairs | {f['n']} | {_f(f['p50_ms'], ' ms')} | "
                     f"{_f(f['p95_ms'], ' ms')} | {_f(f['max_ms'], ' ms')} |")
    b = r.get("bpf") or {}
    for key, label in (("scenario", "demo scenario"), ("loaded", None)):
        if key not in b:
            continue
        label = label or f"+{b['bulk_load']['services']:,} services"
        x = b[key]
        for op, what in (("add", "Service file added → VIP in nm_services"),
                         ("remove", "Service file deleted → VIP gone from nm_services")):
            s = x[op]
            lines.append(f"| {what} ({label}, {x['services_in_map']} VIPs) | {s['n']} | "
                         f"{_f(s['p50_ms'], ' ms')} | {_f(s['p95_ms'], ' ms')} | "
                         f"{_f(s['max_ms'], ' ms')} |")
    lines.append("")
    facts = []
    if "resources" in cp:
        facts.append(f"- Snapshot: {cp['resources']} from {cp['files']:,} files "
                     f"({cp['folder_bytes'] / 1e6:.1f} MB); control plane load "
                     f"{cp['control_plane_load_s']:.2f} s.")
    if "initial_sync" in cp:
        s = cp["initial_sync"]
        facts.append(f"- All {s['clients']} clients in full sync after "
                     f"{_f(s['all_synced_s'], ' s')}; clients with wrong resource counts: "
                     f"{len(s['clients_with_wrong_counts'])}.")
    if "fanout" in cp:
        f = cp["fanout"]
        facts.append(f"- Per update, last client: p50 {_f(f['last_client_p50_ms'], ' ms')}, max "
                     f"{_f(f['last_client_max_ms'], ' ms')}. Breakdown (p50): waiting for the "
                     f"folder poll {_f(f['poll_wait_p50_ms'], ' ms')}, re-read + translate "
                     f"{_f(f['reread_translate_p50_ms'], ' ms')} (YAML re-read of the whole "
                     f"folder {_f(f['yaml_reread_p50_ms'], ' ms')}, translate and install "
                     f"{_f(f['translate_p50_ms'], ' ms')}), new snapshot → last client "
                     f"{_f(f['snapshot_to_last_client_p50_ms'], ' ms')}. Missing (client, "
                     f"update) pairs: {f['pairs_missing']}.")
    if "update_responses" in cp:
        u = cp["update_responses"]
        facts.append(f"- Responses after the initial sync: {u['responses']} (expected "
                     f"{u['expected']}: one per client per edit), by type {u['by_type']}, "
                     f"resources per response {u['resources_per_response']}, removed names "
                     f"{u['removed_names']} → only the changed resource sent: "
                     f"**{'yes' if u['only_changed_resource'] else 'NO'}**.")
    if "server_accounts" in cp:
        a = cp["server_accounts"]
        facts.append(f"- Server accounts: {a['acks_recorded']:,} ACKs recorded "
                     f"({a['acks_sent_by_clients']:,} sent), {a['nacks']} NACKs; bench "
                     f"process max RSS (control plane + clients) {cp['process_max_rss_mib']} MiB.")
    if "bulk_load" in b:
        bl = b["bulk_load"]
        facts.append(f"- Agent: {bl['services']:,} services / {bl['endpoints']:,} endpoints "
                     f"({bl['files']:,} files) written → all in nm_services after "
                     f"{_f(bl['to_map_s'], ' s')}.")
    if b.get("skipped"):
        facts.append(f"- BPF phase skipped: {b['skipped']}")
    if b.get("error"):
        facts.append(f"- BPF phase failed: {b['error']}")
    if cp.get("error"):
        facts.append(f"- Control plane phase failed: {cp['error']}")
    return "\n".join(lines + facts) + "\n"


# -- the command line ---------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.xds_bench",
        description="xDS control plane benchmark: initial sync and update fan-out to "
                    "simulated delta ADS clients, and YAML edit -> BPF map on a sandbox agent.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Full: 1,000 services / 10,000 endpoints / 50 clients / 20 edits (~2-4 min).\n"
               "--quick: 100 / 1,000 / 10 clients / 5 edits (<30 s).")
    p.add_argument("--quick", action="store_true", help="a smoke run (the smaller defaults)")
    p.add_argument("--services", type=int, help="services (full 1000, quick 100)")
    p.add_argument("--endpoints", type=int, help="endpoints in all (full 10000, quick 1000)")
    p.add_argument("--clients", type=int, help="simulated delta clients (full 50, quick 10)")
    p.add_argument("--updates", type=int, help="EndpointSlice edits (full 20, quick 5)")
    p.add_argument("--bpf-edits", type=int, help="Service add+remove rounds on the agent "
                   "(full 10, quick 3)")
    p.add_argument("--bpf-loaded-edits", type=int, help="the same after loading --bpf-services "
                   "services into the agent's folder (full 3, quick 2)")
    p.add_argument("--bpf-services", type=int,
                   help="services loaded into the sandbox folder before the second BPF round "
                        "(default: --services; 0 skips that round)")
    p.add_argument("--bpf-endpoints", type=int, help="their endpoints (default: --endpoints)")
    p.add_argument("--poll-interval", type=float, default=0.25,
                   help="control plane folder poll, s (default 0.25, as the agent's)")
    p.add_argument("--skip-bpf", action="store_true", help="only the control plane phase")
    p.add_argument("--out", type=Path, help="results folder (default bench/results/"
                   "<YYYY-MM-DD>-<hostname>); files xds.json/xds.md, xds-quick.* for --quick")
    p.add_argument("-v", "--verbose", action="store_true", help="control plane logs at INFO")
    return p


_MAIN_PID = os.getpid()


def _interrupt(signum: int, _frame: Any) -> None:
    if os.getpid() != _MAIN_PID:  # a forked helper (pyroute2): die, do not unwind our stack
        os._exit(128 + signum)
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    args = build_parser().parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.bpf_services is None:
        args.bpf_services = args.services
    if args.bpf_endpoints is None:
        args.bpf_endpoints = args.endpoints
    counts = (args.endpoints, args.updates, args.bpf_edits, args.bpf_loaded_edits,
              args.bpf_services, args.bpf_endpoints)
    if args.services < 1 or args.clients < 1 or min(counts) < 0:
        print("xds_bench: error: --services and --clients must be >= 1, the other counts >= 0",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)

    t_start = time.monotonic()

    def say(text: str) -> None:
        print(f"[{time.monotonic() - t_start:6.1f}s] {text}", flush=True)

    now = datetime.datetime.now()
    command = shlex.join([Path(sys.executable).relative_to(REPO).as_posix()
                          if sys.executable.startswith(str(REPO)) else sys.executable,
                          "-m", "bench.xds_bench", *(sys.argv[1:] if argv is None else argv)])
    result: dict[str, Any] = {
        "benchmark": "xds", "date": now.date().isoformat(), "started": now.isoformat(
            timespec="seconds"), "command": command, "argv": sys.argv if argv is None else argv,
        "params": {k: getattr(args, k) for k in (
            "services", "endpoints", "clients", "updates", "bpf_edits", "bpf_loaded_edits",
            "bpf_services", "bpf_endpoints", "poll_interval", "quick", "skip_bpf")},
        "machine": machine_facts(),
        "setup": {
            "control_plane": "controlplane.service.serve in this process, uvloop, TCP 127.0.0.1",
            "clients": "grpc.aio delta ADS streams, one channel (TCP connection) each, in the "
                       "same process and event loop as the control plane: their decoding "
                       "shares its CPU and GIL",
            "edits": "atomic rename of one file, at a random phase of the folder poll",
            "bpf": "sandbox Scenario + agent with its embedded control plane (unix socket); "
                   "nm_services read through a BPF_F_RDONLY fd, polled every 1 ms",
        },
    }
    failed = False
    workdir = Path(tempfile.mkdtemp(prefix="nodemesh-xdsbench-"))
    try:
        import uvloop

        fanout = FanoutBench(args, say)
        try:
            result["control_plane"] = uvloop.run(fanout.run(workdir))
        except BenchError as exc:
            say(f"control plane phase failed: {exc}")
            result["control_plane"] = {**fanout.result, "error": str(exc)}  # what was measured
            failed = True
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        if args.skip_bpf:
            result["bpf"] = {"skipped": "--skip-bpf"}
        elif os.geteuid() != 0:
            result["bpf"] = {"skipped": "not root (the sandbox needs netns, cgroups and BPF)"}
            failed = True
        else:
            try:
                result["bpf"] = bpf_phase(args, say)
                b = result["bpf"]
                if any(b.get(k, {}).get("timeouts") for k in ("scenario", "loaded")):
                    failed = True
            except Exception as exc:  # noqa: BLE001 - recorded; the sandbox is already torn down
                say(f"BPF phase failed: {type(exc).__name__}: {exc}")
                result["bpf"] = {"error": str(exc).splitlines()[0] if str(exc) else repr(exc)}
                failed = True
        fan = (result.get("control_plane") or {}).get("fanout") or {}
        if fan.get("pairs_missing"):
            failed = True
    except KeyboardInterrupt:
        print("xds_bench: interrupted; cleaned up, no results written", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["wall_s"] = round(time.monotonic() - t_start, 1)
    result["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    out = args.out or RESULTS / f"{now.date().isoformat()}-{socket.gethostname()}"
    out.mkdir(parents=True, exist_ok=True)
    # A smoke run never overwrites the full run's numbers.
    stem = "xds-quick" if args.quick else "xds"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = render_md(result)
    (out / f"{stem}.md").write_text(md)
    print()
    print(md)
    print(f"written: {out / f'{stem}.json'}, {out / f'{stem}.md'} ({result['wall_s']} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
