"""Enrollment: which of this node's pods are in the mesh, and making it so.

``decide`` is pure (registry in, one decision per pod out, with the reason);
``Enroller`` applies decisions: it opens the in-pod listener inside the pod's
netns, hands it to the proxy, and only then adds the netns cookie to the BPF
enrolled map (so a redirected connect always finds a listener). Removal runs
in the opposite order.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from agent import netns
from agent.bpf_layout import LOOPBACK_IP, OUTBOUND_PORT
from controlplane.registry import MESH_LABEL, Registry
from dataplane.outbound import MAX_CONNECT_ATTEMPTS, OutboundProxy, PodContext
from dataplane.upstream_sockets import UpstreamSockets
from nodemesh.errors import UserError

log = logging.getLogger("nodemesh.enrollment")


@dataclass(frozen=True)
class Decision:
    pod: str  # namespace/name
    namespace: str
    name: str
    ip: str | None
    netns_path: str | None
    enroll: bool
    reason: str


def decide(registry: Registry, node_name: str) -> list[Decision]:
    out = []
    for key in sorted(registry.pods):
        pod = registry.pods[key]
        if pod.node_name != node_name:
            continue  # another node's agent owns it
        ns = registry.namespaces.get(pod.namespace)
        ns_label = ns.labels.get(MESH_LABEL) if ns else None
        pod_label = pod.labels.get(MESH_LABEL)
        if ns_label != "enabled":
            enroll = False
            reason = (f"namespace {pod.namespace} not labelled {MESH_LABEL}=enabled"
                      if ns is not None else f"namespace {pod.namespace} not declared")
        elif pod_label == "disabled":
            enroll, reason = False, f"pod opted out ({MESH_LABEL}=disabled)"
        elif not pod.netns_path:
            enroll, reason = False, "netns unknown (annotation nodemesh.io/netns missing)"
        else:
            enroll, reason = True, f"namespace {pod.namespace} labelled {MESH_LABEL}=enabled"
        out.append(Decision(pod=key, namespace=pod.namespace, name=pod.name, ip=pod.pod_ip,
                            netns_path=pod.netns_path, enroll=enroll, reason=reason))
    return out


@dataclass
class _Enrolled:
    decision: Decision
    ctx: PodContext
    listener: socket.socket
    server: asyncio.AbstractServer
    netns_id: tuple[int, int]  # (st_dev, st_ino) of the netns file when enrolled


def _netns_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class Enroller:
    def __init__(self, proxy: OutboundProxy, bpf: Any) -> None:
        self.proxy = proxy
        self.bpf = bpf
        self.enrolled: dict[str, _Enrolled] = {}
        self.errors: dict[str, str] = {}  # pod -> why enrollment failed
        self.decisions: list[Decision] = []

    async def apply(self, decisions: Iterable[Decision]) -> None:
        self.decisions = list(decisions)
        wanted = {d.pod: d for d in self.decisions if d.enroll}
        for key in list(self.enrolled):
            cur = self.enrolled[key]
            new = wanted.get(key)
            if new is None or new.netns_path != cur.decision.netns_path or new.ip != cur.decision.ip:
                await self._remove(key)
        for key in list(self.errors):
            if key not in wanted:
                del self.errors[key]
        for key, d in wanted.items():
            if key not in self.enrolled:
                await self._add(d)

    async def _add(self, d: Decision) -> None:
        assert d.netns_path is not None
        fd = -1
        try:
            fd = netns.open_netns(d.netns_path)
            cookie = netns.netns_cookie(fd)
            listener = netns.socket_in(fd)
            try:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind((LOOPBACK_IP, OUTBOUND_PORT))
                listener.listen(1024)
                listener.setblocking(False)
            except OSError as exc:
                listener.close()
                raise UserError(f"cannot listen on {LOOPBACK_IP}:{OUTBOUND_PORT} in pod "
                                f"{d.pod}'s netns: {exc.strerror}") from None
        except UserError as exc:
            if fd >= 0:
                os.close(fd)
            if self.errors.get(d.pod) != str(exc):
                log.error("cannot enroll %s: %s", d.pod, exc)
            self.errors[d.pod] = str(exc)
            return
        ctx = PodContext(key=d.pod, ip=d.ip, netns_fd=fd, netns_cookie=cookie,
                         sockets=UpstreamSockets(fd))
        ident = os.fstat(fd)
        server = await self.proxy.serve(ctx, listener)
        self.bpf.enroll(cookie)
        self.errors.pop(d.pod, None)
        self.enrolled[d.pod] = _Enrolled(d, ctx, listener, server, (ident.st_dev, ident.st_ino))
        log.info("enrolled %s (netns %s, cookie %d)", d.pod, d.netns_path, cookie)

    async def _remove(self, key: str) -> None:
        self._remove_now(key)

    def _remove_now(self, key: str) -> None:
        e = self.enrolled.pop(key)
        self.bpf.unenroll(e.ctx.netns_cookie)
        e.server.close()
        if e.ctx.sockets is not None:
            e.ctx.sockets.close()  # idle sockets would keep a deleted netns alive
        # Live flows keep their sockets; only new connections stop. A handler
        # still connecting may yet create an upstream socket in this netns, so
        # the fd is closed only after the longest connect sequence could last
        # (closing now could let the number be reused by another netns).
        grace = self.proxy.connect_timeout * (MAX_CONNECT_ATTEMPTS + 1)
        asyncio.get_running_loop().call_later(grace, os.close, e.ctx.netns_fd)
        log.info("unenrolled %s", key)

    def drop_vanished(self) -> bool:
        """Unenroll pods whose netns went away (or was replaced) under us. Our fd
        would otherwise keep a dead pod's netns alive until its manifest changes;
        a replaced netns is enrolled afresh by the next ``apply``."""
        gone = False
        for key, e in list(self.enrolled.items()):
            assert e.decision.netns_path is not None
            if _netns_id(e.decision.netns_path) != e.netns_id:
                log.warning("%s: netns %s is gone or replaced: unenrolling", key,
                            e.decision.netns_path)
                self._remove_now(key)
                gone = True
        return gone

    async def remove_all(self) -> None:
        for key in list(self.enrolled):
            await self._remove(key)

    def rows(self) -> list[dict[str, Any]]:
        rows = []
        for d in self.decisions:
            e = self.enrolled.get(d.pod)
            err = self.errors.get(d.pod)
            rows.append({
                "pod": d.pod, "ip": d.ip, "netns": d.netns_path,
                "enrolled": e is not None,
                "reason": err if err else d.reason,
                "netns_cookie": e.ctx.netns_cookie if e else None,
                "listener": f"{LOOPBACK_IP}:{OUTBOUND_PORT}" if e else None,
            })
        return rows
