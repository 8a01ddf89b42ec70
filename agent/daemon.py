"""The agent daemon: load BPF, watch the workload source, keep enrollment, the
BPF service map and the proxy's service table in step, serve the admin
endpoint, and undo all of it on the way out (SIGTERM, SIGINT or an error)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import Any

from agent import admin
from agent.bpf_loader import BpfDatapath, uninstall
from agent.config import AgentConfig
from agent.enrollment import Enroller, decide
from controlplane.yaml_source import YamlDirectorySource
from dataplane.flows import FlowTable
from dataplane.outbound import OutboundProxy
from dataplane.services import build_service_table

log = logging.getLogger("nodemesh.agent")


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.source = YamlDirectorySource(config.config_dir)
        self.bpf = BpfDatapath(config.instance, config.cgroup_root)
        self.flows = FlowTable()
        self.proxy = OutboundProxy(self.bpf.take_orig_dst, self.flows, config.connect_timeout)
        self.enroller = Enroller(self.proxy, self.bpf)
        self.ready = False
        self.started = time.time()
        self.reloads = 0
        self._reported: tuple[str, ...] = ()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        runner = None
        lock = self.config.instance.lock()
        try:
            if self.config.instance.pin_dir.exists():
                # We hold the lock, so whoever pinned these is gone: a crash.
                for line in uninstall(self.config.instance, keep_lock=True):
                    log.warning("cleaned up after a previous agent: %s", line)
            self.bpf.load()
            log.info("BPF programs attached under %s, maps pinned in %s",
                     self.config.cgroup_root, self.config.instance.pin_dir)
            runner = await admin.start(self, self.config.instance.admin_socket)
            await self.reconcile(force=True)
            self.ready = True
            log.info("agent ready (node %s, instance %s, admin %s)", self.config.node_name,
                     self.config.instance.name, self.config.instance.admin_socket)
            while not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), self.config.poll_interval)
                except TimeoutError:
                    await self.reconcile()
            log.info("stopping: unenrolling pods and detaching BPF programs")
        finally:
            self.ready = False
            await self.enroller.remove_all()
            if runner is not None:
                await runner.cleanup()
            self.config.instance.admin_socket.unlink(missing_ok=True)
            self.bpf.close()
            self.config.instance.lock_file.unlink(missing_ok=True)
            os.close(lock)
            try:
                os.rmdir(self.config.instance.run_dir)
            except OSError:
                pass

    async def reconcile(self, force: bool = False) -> None:
        changed = self.source.poll()
        if changed:
            self.reloads += 1
            problems = tuple(str(p) for p in self.source.problems)
            for p in problems:
                if p not in self._reported:
                    log.error("config: %s", p)
            self._reported = problems
            registry = self.source.registry
            table = build_service_table(registry)
            # The proxy learns a new service before BPF redirects to it; a
            # connect to a removed one caught in between is reset, as it
            # should be.
            self.proxy.set_table(table)
            self.bpf.sync_services(table.bpf_entries())
        if changed or force or self.enroller.errors:
            # Failed enrollments are retried each tick: a pod's netns may
            # appear after its manifest does.
            await self.enroller.apply(decide(self.source.registry, self.config.node_name))

    def status(self) -> dict[str, Any]:
        table = self.proxy.table
        return {
            "instance": self.config.instance.name,
            "node": self.config.node_name,
            "pid": os.getpid(),
            "uptime_seconds": round(time.time() - self.started, 1),
            "config_dir": str(self.config.config_dir),
            "config_reloads": self.reloads,
            "config_problems": [str(p) for p in self.source.problems],
            "cgroup_root": str(self.config.cgroup_root),
            "programs": [a.__dict__ for a in self.bpf.attachments],
            "kernel_attachments": self.bpf.kernel_view(),
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
        }
