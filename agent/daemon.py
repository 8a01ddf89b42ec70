"""The agent daemon: load BPF, enroll this node's pods from the local workload
source, take services and endpoints over xDS (from our embedded control plane
or an external one), keep the BPF service map and the proxy's table in step
with them, serve the admin endpoint, and undo all of it on the way out
(SIGTERM, SIGINT or an error)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from typing import Any

from envoy.config.core.v3 import base_pb2
from google.protobuf import struct_pb2

from agent import admin
from agent.bpf_loader import BpfDatapath, uninstall
from agent.config import AgentConfig
from agent.config_store import ConfigStore
from agent.enrollment import Enroller, decide
from agent.telemetry_glue import TelemetryGlue, request_headers
from agent.xds_client import XdsClient
from agent.xds_state import XdsConfig
from controlplane.yaml_source import YamlDirectorySource
from dataplane.flows import FlowTable
from dataplane.http1_proxy import Http1Proxy
from dataplane.http2_proxy import Http2Proxy
from dataplane.outbound import OutboundProxy
from dataplane.pipe_splice import PipeSplicer
from dataplane.services import ServiceTable
from dataplane.splice import SockmapSplicer
from dataplane.telemetry import Telemetry
from dataplane.upstreams import Upstreams
from nodemesh.errors import UserError

log = logging.getLogger("nodemesh.agent")


def _node(config: AgentConfig) -> base_pb2.Node:
    meta = struct_pb2.Struct()
    meta.update({"NODE_NAME": config.node_name, "INSTANCE": config.instance.name})
    return base_pb2.Node(id=f"nodemesh~{config.node_name}~{config.instance.name}",
                         cluster="nodemesh", metadata=meta, user_agent_name="nodemesh")


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.source = YamlDirectorySource(config.config_dir)
        self.bpf = BpfDatapath(config.instance, config.cgroup_root, config.l4_engine)
        self.telemetry = Telemetry()
        glue = TelemetryGlue(self.telemetry, lambda: self.source.registry)
        self.flows = FlowTable(on_close=glue.on_tcp_close)
        self.splicer: SockmapSplicer | PipeSplicer | None = None
        if config.l4_engine == "sockmap":
            self.splicer = SockmapSplicer(self.bpf)
        elif config.l4_engine == "splice":
            self.splicer = PipeSplicer(on_done=self.flows.close)
        self.upstreams = Upstreams()
        self.http = Http1Proxy(self.upstreams, config.connect_timeout,
                               on_request=glue.on_request, request_headers=request_headers)
        self.http2 = Http2Proxy(self.upstreams, config.connect_timeout,
                                on_request=glue.on_request, request_headers=request_headers)
        self.proxy = OutboundProxy(self.bpf.take_orig_dst, self.flows, config.connect_timeout,
                                   http=self.http, sniff_window=config.sniff_window,
                                   on_tcp_open=glue.on_tcp_open, http2=self.http2,
                                   splicer=self.splicer)
        self.enroller = Enroller(self.proxy, self.bpf)
        self.embedded = config.xds_address is None
        address = config.xds_address or f"unix:{config.instance.run_dir / 'xds.sock'}"
        self.xds = XdsClient(address, _node(config), self._apply_services,
                             ConfigStore(config.config_store_path), mode=config.xds_mode)
        self.loaded = False
        self.started = time.time()
        self.reloads = 0
        self._reported: tuple[str, ...] = ()

    @property
    def ready(self) -> bool:
        """Serving: BPF attached and services known (from the control plane or from
        the persisted config while the control plane is unreachable)."""
        return self.loaded and (self.xds.synced.is_set() or self.xds.source == "persisted")

    def _apply_services(self, _config: XdsConfig, table: ServiceTable) -> None:
        # The proxy learns a new service before BPF redirects to it; a connect
        # to a removed one caught in between is reset, as it should be.
        self.upstreams.sync(table)
        self.proxy.set_table(table)
        try:
            self.bpf.sync_services(table.bpf_entries())
        except UserError as exc:
            log.error("%s", exc)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        runner = None
        metrics = None
        tasks: list[asyncio.Task[Any]] = []
        lock = self.config.instance.lock()
        try:
            if self.config.instance.pin_dir.exists():
                # We hold the lock, so whoever pinned these is gone: a crash.
                for line in uninstall(self.config.instance, keep_lock=True):
                    log.warning("cleaned up after a previous agent: %s", line)
            self.bpf.load()
            self.loaded = True
            log.info("BPF programs attached under %s, maps pinned in %s",
                     self.config.cgroup_root, self.config.instance.pin_dir)
            if self.embedded:
                from controlplane.service import serve

                sock = self.config.instance.run_dir / "xds.sock"
                sock.unlink(missing_ok=True)
                tasks.append(loop.create_task(serve(self.config.config_dir, f"unix:{sock}")))
            self.xds.load_persisted()
            tasks.append(loop.create_task(self.xds.run()))
            runner = await admin.start(self, self.config.instance.admin_socket)
            if self.config.metrics_address:
                host, _, port = self.config.metrics_address.rpartition(":")
                metrics = await self.telemetry.serve_metrics(host or "0.0.0.0", int(port),
                                                             ready=lambda: self.ready)
            await self.reconcile(force=True)
            log.info("agent up (node %s, instance %s, admin %s, xDS %s%s)", self.config.node_name,
                     self.config.instance.name, self.config.instance.admin_socket,
                     self.xds.address, " embedded" if self.embedded else "")
            while not stop.is_set():
                for t in tasks:
                    if t.done() and not t.cancelled() and t.exception() is not None:
                        raise t.exception()  # type: ignore[misc]
                try:
                    await asyncio.wait_for(stop.wait(), self.config.poll_interval)
                except TimeoutError:
                    await self.reconcile()
            log.info("stopping: unenrolling pods and detaching BPF programs")
        finally:
            self.loaded = False
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(BaseException):
                    await t
            await self.enroller.remove_all()
            if isinstance(self.splicer, PipeSplicer):
                self.splicer.close_all()
            self.upstreams.close_idle()
            self.http2.close()
            if runner is not None:
                await runner.cleanup()
            if metrics is not None:
                await metrics.cleanup()
            self.config.instance.admin_socket.unlink(missing_ok=True)
            (self.config.instance.run_dir / "xds.sock").unlink(missing_ok=True)
            self.bpf.close()
            self.config.instance.lock_file.unlink(missing_ok=True)
            os.close(lock)
            try:
                os.rmdir(self.config.instance.run_dir)
            except OSError:
                pass

    async def reconcile(self, force: bool = False) -> None:
        """Enrollment stays local: pods and namespaces come from the node's own
        workload source, not from the control plane."""
        # Parsing thousands of manifests takes seconds: off the proxy's event loop.
        changed = await asyncio.to_thread(self.source.poll)
        if changed:
            self.reloads += 1
            problems = tuple(str(p) for p in self.source.problems)
            for p in problems:
                if p not in self._reported:
                    log.error("config: %s", p)
            self._reported = problems
        vanished = self.enroller.drop_vanished()
        if changed or force or vanished or self.enroller.errors:
            # Failed enrollments are retried each tick: a pod's netns may
            # appear after its manifest does.
            await self.enroller.apply(decide(self.source.registry, self.config.node_name))

    def status(self, kernel_view: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        table = self.proxy.table
        x = self.xds
        return {
            "instance": self.config.instance.name,
            "node": self.config.node_name,
            "pid": os.getpid(),
            "ready": self.ready,
            "uptime_seconds": round(time.time() - self.started, 1),
            "config_dir": str(self.config.config_dir),
            "config_reloads": self.reloads,
            "config_problems": [str(p) for p in self.source.problems],
            "xds": {"control_plane": x.address, "embedded": self.embedded, "mode": x.mode,
                    "connected": x.connected, "synced": x.synced.is_set(), "source": x.source,
                    "last_error": x.last_error, "accepted": x.accepted, "rejected": x.rejected},
            "cgroup_root": str(self.config.cgroup_root),
            "programs": [a.__dict__ for a in self.bpf.attachments],
            "kernel_attachments": kernel_view if kernel_view is not None else [],
            "maps": self.bpf.map_sizes(),
            "counters": self.bpf.counters(),
            "enrolled": [r for r in self.enroller.rows() if r["enrolled"]],
            "services": [
                {"service": e.service, "vip": f"{e.vip}:{e.port}",
                 "backends": [b.address for b in e.backends]}
                for e in table.by_vip.values()
            ],
            "proxy": dict(self.proxy.stats, active_flows=len(self.flows),
                          total_flows=self.flows.total_opened),
            "l4_engine": self.config.l4_engine,
            "splice": dict(self.splicer.stats) if self.splicer is not None else None,
            "http": dict(self.http.stats),
            "http2": dict(self.http2.stats,
                          upstream_connections=self.http2.open_upstream_connections()),
        }
