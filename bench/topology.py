"""The benchmark's virtual node: one sandbox, one server pod, one client pod
per peer, and each peer's proxy.

  namespace bench (not in the mesh)
    server        sockperf server :11111, iperf3 -s :5201, nginx :8080
    direct        client: connects to the server pod's IP
    sidecar       client + its own HAProxy on 127.0.0.1:15101; iptables
                  nat OUTPUT REDIRECT (in this pod's netns only) of the
                  service VIP:ports to it
    node-haproxy  client; iptables nat OUTPUT DNAT (in this pod's netns only)
                  of VIP:port to 198.18.0.1:1511x, where ONE HAProxy started
                  in the node netns listens on the bridge address
  namespace mesh (nodemesh.io/mesh=enabled)
    client        client; the nodemesh agent (started as the demo and the
                  tests start it) enrolls it and its connect() to the VIP is
                  rewritten by cgroup/connect4 to the node proxy

  Service bench/server  198.19.1.10  :11111 tcp-latency, :5201 tcp-bulk,
                                     :80 -> 8080 tcp-http (declared TCP: L4 path)

Every process is started with ``Place.spawn`` (tracked, ended by pid; the
sandbox also empties its own cgroup subtree at teardown); iptables rules and
routes are only ever added inside the sandbox's pod netns.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench import tools
from sandbox.node import POD_NET, Place, Pod, Sandbox, stop_processes
from sandbox.scenario import Scenario

VIP = "198.19.1.10"
NODE_IP = str(POD_NET[1])  # the bridge address in the node netns
SIDECAR_PORT = 15101
# service name -> (service port on the VIP, target port on the server pod)
SERVICES = {"latency": (11111, 11111), "bulk": (5201, 5201), "http": (80, 8080)}
AGENT_ARGS = ("--log-level", "warning")
EPHEMERAL_PORTS = "16000 60999"   # above every listener the bench or the agent opens
NODE_PORTS = {"latency": 15111, "bulk": 15112, "http": 15113}

def port_name(service: str) -> str:
    return f"tcp-{service}"


PEERS = ("direct", "sidecar-haproxy", "node-haproxy-iptables", "nodemesh")
PEER_DESCRIPTIONS = {
    "direct": "no mesh: the client pod connects to the server pod's IP",
    "sidecar-haproxy": "iptables REDIRECT in the client pod's netns to an HAProxy "
                       "(mode tcp, nbthread 1) inside the same pod, 127.0.0.1:15101",
    "node-haproxy-iptables": "iptables DNAT in the client pod's netns to one node-level HAProxy "
                             "(mode tcp, nbthread 1) in the node netns, 198.18.0.1:1511x",
    "nodemesh": "eBPF cgroup/connect4 redirect to the nodemesh agent's node proxy "
                "(userspace engine), client in an enrolled namespace",
}


@dataclass
class Result:
    argv: list[str]
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def describe(self) -> str:
        why = "timed out" if self.timed_out else f"exit {self.returncode}"
        tail = (self.stderr.strip() or self.stdout.strip())[-400:]
        return f"{self.argv[0]} {why}: {tail}"


def run(place: Place, argv: Sequence[str], timeout: float) -> Result:
    """Run a client to completion inside ``place``, started through
    ``Place.spawn`` so the sandbox tracks it; killed by pid on timeout."""
    t0 = time.monotonic()
    proc = place.spawn(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=10)
        timed_out = True
    return Result(list(argv), proc.returncode, out or "", err or "", time.monotonic() - t0, timed_out)


def check(place: Place, argv: Sequence[str], timeout: float = 20) -> str:
    res = run(place, argv, timeout)
    if not res.ok:
        raise RuntimeError(f"{' '.join(argv)} failed in {place.netns_name}: {res.describe()}")
    return res.stdout


def wait_listening(place: Place, ports: Sequence[int], proc: subprocess.Popen[Any],
                   timeout: float = 15) -> None:
    """Until every port has a TCP listener in ``place``'s netns (read with ss)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before listening "
                               f"on {list(ports)}")
        out = run(place, ["ss", "-Hltn"], 10).stdout
        bound = {int(line.split()[3].rsplit(":", 1)[1]) for line in out.splitlines() if line.strip()}
        if all(p in bound for p in ports):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{proc.args[0]} not listening on {list(ports)} after {timeout}s")


@dataclass
class Peer:
    name: str
    client: Pod
    host: str                      # where the client connects
    ports: dict[str, int]          # service name -> port the client connects to
    proxies: list[subprocess.Popen[Any]] = field(default_factory=list)

    def target(self, service: str) -> tuple[str, int]:
        return self.host, self.ports[service]

    def url(self, path: str) -> str:
        host, port = self.target("http")
        return f"http://{host}:{port}{path}"

    def proxy_cpu_seconds(self) -> float | None:
        """user+system CPU of this peer's proxy processes, from their own
        accounting (all threads); None when the peer has no proxy."""
        if not self.proxies:
            return None
        total = 0.0
        for p in self.proxies:
            t = psutil.Process(p.pid).cpu_times()
            total += t.user + t.system
        return total


class BenchNode:
    def __init__(self, sb: Sandbox, workdir: Path, logdir: Path) -> None:
        self.sb = sb
        self.workdir = workdir      # configs (removed at the end)
        self.logdir = logdir        # server logs (kept in the results' raw/)
        # The agent plumbing and manifests; not .build(): our own pods. Warnings only: no
        # per-connection access log, as the HAProxy peers log nothing either.
        self.sc = Scenario(sb, agent_args=AGENT_ARGS)
        self.server: Pod
        self.peers: dict[str, Peer] = {}
        self.servers: dict[str, subprocess.Popen[Any]] = {}
        self.node_haproxy: subprocess.Popen[Any] | None = None

    # -- building --------------------------------------------------------------
    def build(self, say: Any) -> None:
        sb, m = self.sb, self.sc.manifests
        m.namespace("bench", mesh=False)
        m.namespace("mesh", mesh=True)
        self.server = sb.add_pod("server", "bench", {"app": "bench-server"})
        direct = sb.add_pod("direct", "bench")
        sidecar = sb.add_pod("sidecar", "bench")
        nodehap = sb.add_pod("node-haproxy", "bench")
        meshc = sb.add_pod("client", "mesh")
        for p in (self.server, direct, sidecar, nodehap, meshc):
            m.pod(p)
        # Port names declare TCP (Istio's "<protocol>-<suffix>" convention): this is the L4
        # benchmark, so nodemesh must take its L4 path even for the port nginx serves on.
        m.service("bench", "server", VIP,
                  [(port_name(n), port, target) for n, (port, target) in SERVICES.items()])
        m.endpoint_slice("bench", "server", [self.server],
                         [(port_name(n), target) for n, (_, target) in SERVICES.items()])
        say(f"pods on 198.18.0.0/24: server {self.server.ip}, direct {direct.ip}, sidecar "
            f"{sidecar.ip}, node-haproxy {nodehap.ip}, mesh client {meshc.ip}; VIP {VIP}")

        # Busy nodes' usual TCP settings, in the sandbox netns only (both are per-netns
        # sysctls), the same for every peer: without them the sidecar, which shares its
        # pod's ephemeral ports with the app, runs out of them within one 5 s connrate
        # round (seen: 6.5k, then 1.2k, then 0.2k conn/s across rounds).
        assert sb.node is not None
        for place in (direct, sidecar, nodehap, meshc, sb.node):
            check(place, ["sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1",
                          f"net.ipv4.ip_local_port_range={EPHEMERAL_PORTS}"])
        self._start_servers()
        vip_ports = {n: port for n, (port, _) in SERVICES.items()}
        self.peers["direct"] = Peer("direct", direct, self.server.ip,
                                    {n: target for n, (_, target) in SERVICES.items()})
        self.peers["sidecar-haproxy"] = self._sidecar(sidecar, vip_ports)
        self.peers["node-haproxy-iptables"] = self._node_haproxy(nodehap, vip_ports)
        say("servers (sockperf, iperf3, nginx) and both HAProxy peers listening; "
            "starting the nodemesh agent (BPF compile and attach)")
        self.sc.start_agent()
        self.wait_enrolled([meshc.key], timeout=30)
        assert self.sc.agent is not None
        self.peers["nodemesh"] = Peer("nodemesh", meshc, VIP, vip_ports, [self.sc.agent])
        self._sanity()

    def _log(self, name: str) -> Any:
        return open(self.logdir / f"{name}.log", "w")

    def _spawn(self, place: Place, argv: list[str], log: str) -> subprocess.Popen[Any]:
        with self._log(log) as f:
            return place.spawn(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def _start_servers(self) -> None:
        srv = self.server
        nginx_dir = self.workdir / "nginx"
        nginx_dir.mkdir()
        conf = nginx_dir / "nginx.conf"
        conf.write_text(tools.nginx_conf(str(nginx_dir), SERVICES["http"][1]))
        self.servers["sockperf"] = self._spawn(
            srv, ["sockperf", "server", "--tcp", "-i", "0.0.0.0", "-p", str(SERVICES["latency"][1])],
            "server-sockperf")
        self.start_iperf3()
        self.servers["nginx"] = self._spawn(
            srv, ["nginx", "-p", str(nginx_dir), "-c", str(conf), "-e", str(nginx_dir / "error.log")],
            "server-nginx")
        wait_listening(srv, [SERVICES["latency"][1]], self.servers["sockperf"])
        wait_listening(srv, [SERVICES["http"][1]], self.servers["nginx"])

    def start_iperf3(self) -> None:
        """(Re)start the iperf3 server: it serves one test at a time, and a
        client that died mid-test can leave it busy."""
        old = self.servers.pop("iperf3", None)
        if old is not None:
            stop_processes([old], grace=2)
        self.servers["iperf3"] = self._spawn(
            self.server, ["iperf3", "-s", "-p", str(SERVICES["bulk"][1])], "server-iperf3")
        wait_listening(self.server, [SERVICES["bulk"][1]], self.servers["iperf3"])

    def _route_vips(self, pod: Pod) -> None:
        # Pods have no default route (sandbox rule), and connect() needs a route
        # before the nat OUTPUT hook can rewrite anything. The VIP range goes to
        # the node's bridge address, which has no route onwards: a packet that
        # escaped the rules would die in the node netns. (nodemesh needs no such
        # route: connect4 rewrites the address before the route lookup.)
        check(pod, ["ip", "route", "add", "198.19.0.0/16", "via", NODE_IP])

    def _sidecar(self, pod: Pod, vip_ports: dict[str, int]) -> Peer:
        cfg = self.workdir / "haproxy-sidecar.cfg"
        routes = {vip_ports[n]: f"{self.server.ip}:{target}" for n, (_, target) in SERVICES.items()}
        cfg.write_text(tools.haproxy_sidecar_conf(f"127.0.0.1:{SIDECAR_PORT}", routes))
        self._route_vips(pod)
        for port in vip_ports.values():
            check(pod, ["iptables", "-w", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", VIP,
                        "--dport", str(port), "-j", "REDIRECT", "--to-ports", str(SIDECAR_PORT)])
        proc = self._spawn(pod, ["haproxy", "-db", "-f", str(cfg)], "haproxy-sidecar")
        wait_listening(pod, [SIDECAR_PORT], proc)
        return Peer("sidecar-haproxy", pod, VIP, vip_ports, [proc])

    def _node_haproxy(self, pod: Pod, vip_ports: dict[str, int]) -> Peer:
        assert self.sb.node is not None
        cfg = self.workdir / "haproxy-node.cfg"
        listeners = {f"{NODE_IP}:{NODE_PORTS[n]}": f"{self.server.ip}:{target}"
                     for n, (_, target) in SERVICES.items()}
        cfg.write_text(tools.haproxy_node_conf(listeners))
        self._route_vips(pod)
        for n, port in vip_ports.items():
            check(pod, ["iptables", "-w", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", VIP,
                        "--dport", str(port), "-j", "DNAT",
                        "--to-destination", f"{NODE_IP}:{NODE_PORTS[n]}"])
        proc = self._spawn(self.sb.node, ["haproxy", "-db", "-f", str(cfg)], "haproxy-node")
        wait_listening(self.sb.node, list(NODE_PORTS.values()), proc)
        self.node_haproxy = proc
        return Peer("node-haproxy-iptables", pod, VIP, vip_ports, [proc])

    def wait_enrolled(self, keys: Sequence[str], timeout: float) -> None:
        want = set(keys)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.admin("/workloads")
            if want <= {r["pod"] for r in rows if r["enrolled"]}:
                return
            time.sleep(0.1)
        raise RuntimeError(f"the agent did not enroll {sorted(want)} within {timeout}s:\n"
                           f"{self.sc.log_text()[-2000:]}")

    def _sanity(self) -> None:
        """Each peer reaches nginx through its own path before anything is measured."""
        for peer in self.peers.values():
            out = check(peer.client, ["curl", "-sS", "--max-time", "5", "-o", "/dev/null",
                                      "-w", "%{http_code} %{size_download}", peer.url("/1k")])
            if out.split() != ["200", str(tools.HTTP_BODY_BYTES)]:
                raise RuntimeError(f"{peer.name}: GET {peer.url('/1k')} answered {out!r}")
        flows = int(self.admin("/status")["counters"]["connect4"]["redirected"])
        if flows < 1:
            raise RuntimeError("nodemesh: the sanity request was not redirected by connect4")

    def assert_alive(self) -> None:
        """Stop the run (rather than record garbage) if a server or proxy died."""
        procs = dict(self.servers)
        for peer in self.peers.values():
            for i, p in enumerate(peer.proxies):
                procs[f"{peer.name} proxy {i}"] = p
        dead = [f"{name} (pid {p.pid}, exit {p.returncode})" for name, p in procs.items()
                if p.poll() is not None]
        if dead:
            hint = f"\nagent log tail:\n{self.sc.log_text()[-1500:]}" if any(
                "nodemesh" in d for d in dead) else ""
            raise RuntimeError("exited during the run: " + ", ".join(dead) + hint)

    # -- the agent -------------------------------------------------------------
    def admin(self, endpoint: str) -> Any:
        """The agent's admin API, read in-process (no CLI process per poll:
        less noise on a 2-core machine)."""
        from agent.instance import Instance
        from nodemesh.admin_client import get
        from nodemesh.errors import UserError

        try:
            return get(Instance(self.sc.instance).admin_socket, endpoint)
        except UserError as exc:
            raise RuntimeError(str(exc)) from None

    def agent_process(self) -> psutil.Process:
        assert self.sc.agent is not None
        return psutil.Process(self.sc.agent.pid)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.sc.stop_agent()
