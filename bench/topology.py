"""The benchmark's virtual node: one sandbox, one server pod, one client pod
per peer, each peer's proxy, and one nodemesh agent per L4 engine.

  namespace bench (not in the mesh)
    server        sockperf :11111, iperf3 -s :5201, nginx :8080 (HTTP/1.1) and
                  :8081 (h2c), echo :7007 (sandbox.apps), gRPC :50051 (sandbox.grpc_apps)
    direct        client: connects to the server pod's IP
    sidecar       client + its own HAProxy on 127.0.0.1:15101 (mode tcp) and
                  127.0.0.1:15102 (mode http, the L7 ports); iptables nat OUTPUT
                  REDIRECT (in this pod's netns only) of the service VIP:ports to it
    node-haproxy  client; iptables nat OUTPUT DNAT (in this pod's netns only)
                  of VIP:port to 198.18.0.1:1511x, where ONE HAProxy started
                  in the node netns listens on the bridge address
  namespace mesh (nodemesh.io/mesh=enabled)
    client        enrolled by the agent of node "node-1" (userspace engine,
                  started as the demo and the tests start it)
    client-<e>    enrolled by the agent of node "node-<e>" (--l4-engine <e>),
                  one per further engine the agent offers

  Service bench/server  198.19.1.10, one port per SERVICES entry below: the
                        port name declares the protocol (tcp-* take nodemesh's
                        L4 path, http-/http2-/grpc- its L7 paths)

Several agents share the node: each has its own --instance (pins under
/sys/fs/bpf/nodemesh/<instance>/), --node-name (an agent enrolls only the pods
whose spec.nodeName is its own), --metrics-address and client pod; their
programs are attached with BPF_F_ALLOW_MULTI on the same pods cgroup, and each
one's connect4 only rewrites connections of the pods it enrolled.

Every process is started with ``Place.spawn`` (tracked, ended by pid; the
sandbox also empties its own cgroup subtree at teardown); iptables rules and
routes are only ever added inside the sandbox's pod netns.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench import tools
from sandbox.node import POD_NET, Place, Pod, Sandbox, stop_processes
from sandbox.scenario import NODEMESH, PY, Scenario

VIP = "198.19.1.10"
NODE_IP = str(POD_NET[1])  # the bridge address in the node netns
SIDECAR_PORT = 15101
SIDECAR_HTTP_PORT = 15102
EPHEMERAL_PORTS = "16000 60999"   # above every listener the bench or the agent opens
INTEGRITY_CLIENT = str(Path(__file__).resolve().with_name("integrity.py"))
GRPC_METHOD = "/nodemesh.sandbox.Hello/Echo"
GRPC_MESSAGE = b"nodemesh-bench-grpc-" * 3 + b"0123"   # 64 bytes, echoed back by the server


@dataclass(frozen=True)
class Svc:
    port_name: str     # declares the protocol to nodemesh (Istio's "<protocol>-<suffix>")
    port: int          # on the VIP
    target: int        # on the server pod
    node_port: int     # the node HAProxy's listener for it
    mode: str          # how the HAProxy peers forward it: tcp, h1 or h2 (tools.L7_MODES)


SERVICES = {
    # L4: declared TCP, so nodemesh takes its L4 path (its engine) even for nginx's port
    "latency": Svc("tcp-latency", 11111, 11111, 15111, "tcp"),
    "bulk": Svc("tcp-bulk", 5201, 5201, 15112, "tcp"),
    "http": Svc("tcp-http", 80, 8080, 15113, "tcp"),
    "echo": Svc("tcp-echo", 7, 7007, 15114, "tcp"),
    # L7: nodemesh's HTTP/1.1 and HTTP/2 paths; the HAProxy peers in mode http
    "http-l7": Svc("http-web", 81, 8080, 15115, "h1"),
    "h2": Svc("http2-web", 82, 8081, 15116, "h2"),
    "grpc": Svc("grpc-echo", 50051, 50051, 15117, "h2"),
}
L7_SERVICES = tuple(n for n, s in SERVICES.items() if s.mode != "tcp")

# The nodemesh peers: one agent per L4 engine. "nodemesh" keeps its name (the userspace
# engine, the default); an engine the agent does not offer is left out with a message.
ENGINES = ("userspace", "sockmap", "splice")
ENGINE_PEERS = {"userspace": "nodemesh", "sockmap": "nodemesh-sockmap", "splice": "nodemesh-splice"}
PEERS = ("direct", "sidecar-haproxy", "node-haproxy-iptables", *ENGINE_PEERS.values())
NODEMESH_PEERS = tuple(ENGINE_PEERS.values())
# The L7 scenarios compare the userspace agent's HTTP paths (the L4 engine does not touch
# them) with the HAProxy peers in mode http; the byte-exact check runs through every engine.
L7_PEERS = ("direct", "sidecar-haproxy", "node-haproxy-iptables", "nodemesh")
INTEGRITY_PEERS = ("direct", *NODEMESH_PEERS)
# Each agent's Prometheus endpoint, in the node netns (the default 0.0.0.0:15020 would
# collide between agents).
METRICS_PORTS = {"userspace": 15020, "sockmap": 15021, "splice": 15022}
AGENT_ARGS = ("--log-level", "warning")


def agent_args(engine: str) -> tuple[str, ...]:
    return (*AGENT_ARGS, "--l4-engine", engine,
            "--metrics-address", f"127.0.0.1:{METRICS_PORTS[engine]}")


PEER_DESCRIPTIONS = {
    "direct": "no mesh: the client pod connects to the server pod's IP",
    "sidecar-haproxy": "iptables REDIRECT in the client pod's netns to an HAProxy (nbthread 1) inside "
                       "the same pod: 127.0.0.1:15101 mode tcp, 127.0.0.1:15102 mode http for the "
                       "L7 ports",
    "node-haproxy-iptables": "iptables DNAT in the client pod's netns to one node-level HAProxy "
                             "(nbthread 1) in the node netns, 198.18.0.1:1511x, one listener per "
                             "service port (mode http on the L7 ports)",
    "nodemesh": "eBPF cgroup/connect4 redirect to the nodemesh agent's node proxy "
                "(userspace L4 engine: asyncio/uvloop relay), client in an enrolled namespace",
    "nodemesh-sockmap": "the same, with an agent started with --l4-engine sockmap (EXPERIMENTAL: "
                        "SOCKHASH + sk_skb stream verdict splice the two sockets in the kernel)",
    "nodemesh-splice": "the same, with an agent started with --l4-engine splice (splice(2) "
                       "socket -> pipe -> socket, each direction, on the proxy's event loop)",
}


def offered_engines() -> tuple[tuple[str, ...], str]:
    """The L4 engines ``nodemesh agent`` offers (its --l4-engine choices), and the
    help line they were read from."""
    res = subprocess.run([NODEMESH, "agent", "--help"], capture_output=True, text=True,
                         timeout=30, check=False)
    m = re.search(r"--l4-engine \{([a-z0-9_,-]+)\}", res.stdout)
    if not m:
        return ("userspace",), "no --l4-engine option in `nodemesh agent --help`"
    return tuple(m.group(1).split(",")), f"--l4-engine {{{m.group(1)}}}"


class EngineAgent(Scenario):
    """One more agent on the sandbox node: its own instance, node name and
    Prometheus port, the same manifest folder as the first."""

    def __init__(self, sb: Sandbox, engine: str) -> None:
        super().__init__(sb, agent_args=agent_args(engine))
        self.engine = engine
        self.node_name = f"node-{engine}"
        self.instance = sb.agent_instance(engine)
        self.agent_log = sb.workdir / f"agent-{engine}.log"

    def agent_argv(self) -> list[str]:
        argv = super().agent_argv()
        argv[argv.index("--node-name") + 1] = self.node_name
        return argv


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
    engine: str | None = None      # nodemesh peers: the agent's L4 engine
    agent: Scenario | None = None  # nodemesh peers: the agent
    broken: str | None = None      # set when its (experimental) agent died mid-run

    def target(self, service: str) -> tuple[str, int]:
        return self.host, self.ports[service]

    def url(self, path: str, service: str = "http") -> str:
        host, port = self.target(service)
        return f"http://{host}:{port}{path}"

    def proxy_cpu_seconds(self) -> float | None:
        """user+system CPU of this peer's proxy processes, from their own
        accounting (all threads); None when the peer has no proxy (or it is gone)."""
        if not self.proxies:
            return None
        total = 0.0
        for p in self.proxies:
            try:
                t = psutil.Process(p.pid).cpu_times()
            except psutil.Error:
                return None
            total += t.user + t.system
        return total


class BenchNode:
    def __init__(self, sb: Sandbox, workdir: Path, logdir: Path) -> None:
        self.sb = sb
        self.workdir = workdir      # configs (removed at the end)
        self.logdir = logdir        # server logs (kept in the results' raw/)
        # The first agent, started exactly as the demo and the tests start it (userspace engine,
        # node-1), and its manifests; not .build(): our own pods. Warnings only: no per-connection
        # access log, as the HAProxy peers log nothing either.
        self.sc = Scenario(sb, agent_args=agent_args("userspace"))
        self.agents: dict[str, Scenario] = {"userspace": self.sc}
        self.server: Pod
        self.peers: dict[str, Peer] = {}
        self.servers: dict[str, subprocess.Popen[Any]] = {}
        self.node_haproxy: subprocess.Popen[Any] | None = None
        # engine -> why it is not in this run (not offered, did not start, failed its sanity check)
        self.engines_missing: dict[str, str] = {}
        self.engines_offered: tuple[str, ...] = ()
        self.engines_help = ""

    # -- building --------------------------------------------------------------
    def build(self, say: Any, peers_needed: Sequence[str] = PEERS) -> None:
        """The node, and the peers of ``peers_needed`` (nodemesh's userspace agent always:
        the memory scenario measures it; a further engine's agent only when one of the
        selected scenarios measures its peer)."""
        sb, m = self.sb, self.sc.manifests
        self.engines_offered, self.engines_help = offered_engines()
        engines = []
        for e in ENGINES:
            if e not in self.engines_offered:
                self.engines_missing[e] = (f"not offered by this nodemesh agent ({self.engines_help}): "
                                           f"peer {ENGINE_PEERS[e]} left out")
                say(f"engine {e}: {self.engines_missing[e]}")
            elif e != "userspace" and ENGINE_PEERS[e] not in peers_needed:
                self.engines_missing[e] = "not started: none of the selected scenarios measures it"
            else:
                engines.append(e)
        if "userspace" not in engines:
            raise RuntimeError(f"nodemesh agent does not offer the userspace engine ({self.engines_help})")
        for e in engines[1:]:
            self.agents[e] = EngineAgent(sb, e)
        m.namespace("bench", mesh=False)
        m.namespace("mesh", mesh=True)
        # The agents compile their BPF programs (BCC: seconds of CPU each) while the pods, the
        # servers and the HAProxy peers are set up; they pick the pods up from the manifests.
        for agent in self.agents.values():
            self._launch(agent)
        self.server = sb.add_pod("server", "bench", {"app": "bench-server"})
        direct = sb.add_pod("direct", "bench")
        sidecar = sb.add_pod("sidecar", "bench")
        nodehap = sb.add_pod("node-haproxy", "bench")
        for p in (self.server, direct, sidecar, nodehap):
            m.pod(p)
        mesh_clients: dict[str, Pod] = {}
        for e, agent in self.agents.items():
            pod = sb.add_pod("client" if e == "userspace" else f"client-{e}", "mesh")
            m.pod(pod, node_name=None if e == "userspace" else agent.node_name)  # type: ignore[attr-defined]
            mesh_clients[e] = pod
        m.service("bench", "server", VIP, [(s.port_name, s.port, s.target) for s in SERVICES.values()])
        m.endpoint_slice("bench", "server", [self.server],
                         [(s.port_name, s.target) for s in SERVICES.values()])
        say(f"pods on 198.18.0.0/24: server {self.server.ip}, direct {direct.ip}, sidecar "
            f"{sidecar.ip}, node-haproxy {nodehap.ip}, mesh clients "
            + ", ".join(f"{p.ip} ({e})" for e, p in mesh_clients.items()) + f"; VIP {VIP}")

        # Busy nodes' usual TCP settings, in the sandbox netns only (both are per-netns
        # sysctls), the same for every peer: without them the sidecar, which shares its
        # pod's ephemeral ports with the app, runs out of them within one 5 s connrate
        # round (seen: 6.5k, then 1.2k, then 0.2k conn/s across rounds).
        assert sb.node is not None
        for place in (direct, sidecar, nodehap, *mesh_clients.values(), sb.node):
            check(place, ["sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1",
                          f"net.ipv4.ip_local_port_range={EPHEMERAL_PORTS}"])
        self._start_servers()
        vip_ports = {n: s.port for n, s in SERVICES.items()}
        self.peers["direct"] = Peer("direct", direct, self.server.ip,
                                    {n: s.target for n, s in SERVICES.items()})
        self.peers["sidecar-haproxy"] = self._sidecar(sidecar, vip_ports)
        self.peers["node-haproxy-iptables"] = self._node_haproxy(nodehap, vip_ports)
        say("servers (sockperf, iperf3, nginx, echo, gRPC) and both HAProxy peers listening; "
            f"waiting for {len(self.agents)} nodemesh agent(s) (engines {', '.join(self.agents)}: "
            "BPF compile and attach)")
        for e, agent in list(self.agents.items()):
            try:
                self._wait_ready(agent, timeout=60)
                self.wait_enrolled([mesh_clients[e].key], timeout=30, agent=agent)
            except RuntimeError as exc:
                if e == "userspace":
                    raise
                self._drop_engine(e, f"its agent did not come up: {exc}", say)
                continue
            assert agent.agent is not None
            self.peers[ENGINE_PEERS[e]] = Peer(ENGINE_PEERS[e], mesh_clients[e], VIP, vip_ports,
                                               [agent.agent], engine=e, agent=agent)
        self._sanity(say)

    def _drop_engine(self, engine: str, why: str, say: Any) -> None:
        self.engines_missing[engine] = why
        self.peers.pop(ENGINE_PEERS[engine], None)
        agent = self.agents.pop(engine, None)
        if agent is not None:
            with contextlib.suppress(Exception):
                agent.stop_agent()
            with contextlib.suppress(OSError):
                (self.logdir / f"agent-{engine}.log").write_text(agent.log_text())
        say(f"engine {engine}: left out of this run: {why[:600]}")

    def _launch(self, agent: Scenario) -> None:
        assert self.sb.node is not None
        with open(agent.agent_log, "a") as log:
            agent.agent = self.sb.node.spawn(agent.agent_argv(), stdout=log, stderr=subprocess.STDOUT,
                                             text=True)

    def _wait_ready(self, agent: Scenario, timeout: float) -> None:
        """As Scenario.start_agent waits, through the admin socket in-process."""
        deadline = time.monotonic() + timeout
        assert agent.agent is not None
        while time.monotonic() < deadline:
            if agent.agent.poll() is not None:
                raise RuntimeError(f"agent exited with {agent.agent.returncode}:\n{agent.log_text()[-1500:]}")
            with contextlib.suppress(RuntimeError):
                if self.admin("/status", agent).get("ready"):
                    return
            time.sleep(0.1)
        raise RuntimeError(f"agent not ready after {timeout}s:\n{agent.log_text()[-1500:]}")

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
        conf.write_text(tools.nginx_conf(str(nginx_dir), SERVICES["http"].target, SERVICES["h2"].target))
        self.servers["sockperf"] = self._spawn(
            srv, ["sockperf", "server", "--tcp", "-i", "0.0.0.0", "-p", str(SERVICES["latency"].target)],
            "server-sockperf")
        self.start_iperf3()
        self.servers["nginx"] = self._spawn(
            srv, ["nginx", "-p", str(nginx_dir), "-c", str(conf), "-e", str(nginx_dir / "error.log")],
            "server-nginx")
        self.servers["echo"] = self._spawn(
            srv, [PY, "-m", "sandbox.apps", "echo", "--port", str(SERVICES["echo"].target)], "server-echo")
        self.servers["grpc"] = self._spawn(
            srv, [PY, "-m", "sandbox.grpc_apps", "server", "--port", str(SERVICES["grpc"].target),
                  "--name", "bench-server"], "server-grpc")
        self.grpc_request = self.workdir / "grpc-request.bin"
        self.grpc_request.write_bytes(tools.grpc_frame(GRPC_MESSAGE))
        wait_listening(srv, [SERVICES["latency"].target], self.servers["sockperf"])
        wait_listening(srv, [SERVICES["http"].target, SERVICES["h2"].target], self.servers["nginx"])
        wait_listening(srv, [SERVICES["echo"].target], self.servers["echo"])
        wait_listening(srv, [SERVICES["grpc"].target], self.servers["grpc"], timeout=30)

    def start_iperf3(self) -> None:
        """(Re)start the iperf3 server: it serves one test at a time, and a
        client that died mid-test can leave it busy."""
        old = self.servers.pop("iperf3", None)
        if old is not None:
            stop_processes([old], grace=2)
        self.servers["iperf3"] = self._spawn(
            self.server, ["iperf3", "-s", "-p", str(SERVICES["bulk"].target)], "server-iperf3")
        wait_listening(self.server, [SERVICES["bulk"].target], self.servers["iperf3"])

    def _route_vips(self, pod: Pod) -> None:
        # Pods have no default route (sandbox rule), and connect() needs a route
        # before the nat OUTPUT hook can rewrite anything. The VIP range goes to
        # the node's bridge address, which has no route onwards: a packet that
        # escaped the rules would die in the node netns. (nodemesh needs no such
        # route: connect4 rewrites the address before the route lookup.)
        check(pod, ["ip", "route", "add", "198.19.0.0/16", "via", NODE_IP])

    def _nat_rules(self, pod: Pod, rules: list[str]) -> None:
        """Append rules to the nat table of the pod's own netns, in one iptables-restore
        (--noflush: nothing else is touched); kept in the results' raw/ folder."""
        path = self.logdir / f"iptables-{pod.name}.rules"
        path.write_text("*nat\n" + "\n".join(rules) + "\nCOMMIT\n")
        check(pod, ["iptables-restore", "--noflush", str(path)])

    def _sidecar(self, pod: Pod, vip_ports: dict[str, int]) -> Peer:
        cfg = self.workdir / "haproxy-sidecar.cfg"
        l4 = {s.port: f"{self.server.ip}:{s.target}" for s in SERVICES.values() if s.mode == "tcp"}
        l7 = {s.port: (f"{self.server.ip}:{s.target}", s.mode) for s in SERVICES.values()
              if s.mode != "tcp"}
        cfg.write_text(tools.haproxy_sidecar_conf(f"127.0.0.1:{SIDECAR_PORT}", l4,
                                                  f"127.0.0.1:{SIDECAR_HTTP_PORT}", l7))
        self._route_vips(pod)
        self._nat_rules(pod, [f"-A OUTPUT -p tcp -d {VIP} --dport {s.port} -j REDIRECT --to-ports "
                              f"{SIDECAR_PORT if s.mode == 'tcp' else SIDECAR_HTTP_PORT}"
                              for s in SERVICES.values()])
        proc = self._spawn(pod, ["haproxy", "-db", "-f", str(cfg)], "haproxy-sidecar")
        wait_listening(pod, [SIDECAR_PORT, SIDECAR_HTTP_PORT], proc)
        return Peer("sidecar-haproxy", pod, VIP, vip_ports, [proc])

    def _node_haproxy(self, pod: Pod, vip_ports: dict[str, int]) -> Peer:
        assert self.sb.node is not None
        cfg = self.workdir / "haproxy-node.cfg"
        listeners: dict[str, str | tuple[str, str]] = {
            f"{NODE_IP}:{s.node_port}": (f"{self.server.ip}:{s.target}", s.mode) for s in SERVICES.values()}
        cfg.write_text(tools.haproxy_node_conf(listeners))
        self._route_vips(pod)
        self._nat_rules(pod, [f"-A OUTPUT -p tcp -d {VIP} --dport {s.port} -j DNAT --to-destination "
                              f"{NODE_IP}:{s.node_port}" for s in SERVICES.values()])
        proc = self._spawn(self.sb.node, ["haproxy", "-db", "-f", str(cfg)], "haproxy-node")
        wait_listening(self.sb.node, [s.node_port for s in SERVICES.values()], proc)
        self.node_haproxy = proc
        return Peer("node-haproxy-iptables", pod, VIP, vip_ports, [proc])

    def wait_enrolled(self, keys: Sequence[str], timeout: float, agent: Scenario | None = None) -> None:
        want = set(keys)
        agent = agent or self.sc
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.admin("/workloads", agent)
            if want <= {r["pod"] for r in rows if r["enrolled"]}:
                return
            time.sleep(0.1)
        raise RuntimeError(f"the agent did not enroll {sorted(want)} within {timeout}s:\n"
                           f"{agent.log_text()[-2000:]}")

    def _sanity(self, say: Any) -> None:
        """Each peer reaches nginx through its own path before anything is measured:
        on the L4 port, and for the L7 peers over HTTP/1.1 and h2c on the L7 ports.
        A further engine that fails here is left out of the run; anything else
        stops it."""
        for peer in list(self.peers.values()):
            try:
                self._sanity_peer(peer)
            except RuntimeError as exc:
                if peer.engine in (None, "userspace"):
                    raise
                self._drop_engine(peer.engine, f"failed the sanity check: {exc}", say)

    def _sanity_peer(self, peer: Peer) -> None:
        def curl(service: str, *extra: str) -> None:
            url = peer.url("/1k", service)
            out = check(peer.client, ["curl", "-sS", "--max-time", "5", *extra, "-o", "/dev/null",
                                      "-w", "%{http_code} %{size_download} %{http_version}", url])
            want = ["200", str(tools.HTTP_BODY_BYTES), "2" if "--http2-prior-knowledge" in extra else "1.1"]
            if out.split() != want:
                raise RuntimeError(f"{peer.name}: GET {url} answered {out!r}, expected {want}")

        before = self._redirected(peer)
        curl("http")
        if peer.name in L7_PEERS:   # (gRPC is checked by its scenario, with a grpcio client)
            curl("http-l7")
            curl("h2", "--http2-prior-knowledge")
        if before is not None:
            after = self._redirected(peer)
            if after is None or after <= before:
                raise RuntimeError(f"{peer.name}: the sanity requests were not redirected by connect4 "
                                   f"(counter {before} -> {after})")

    def grpc_unary_all(self, peers: list[Peer], calls: int) -> dict[str, dict[str, Any]]:
        """Echo calls with a real grpcio client from each peer's client pod, all peers at
        once (each is one Python start, ~0.5 s): peer name -> the client's report."""
        procs = {}
        for peer in peers:
            host, port = peer.target("grpc")
            procs[peer.name] = peer.client.spawn(
                [PY, "-m", "sandbox.grpc_apps", "unary", "--target", f"{host}:{port}", "--method", "Echo",
                 "--request", GRPC_MESSAGE.decode(), "--calls", str(calls), "--timeout", "10"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out: dict[str, dict[str, Any]] = {}
        for name, proc in procs.items():
            try:
                stdout, stderr = proc.communicate(timeout=40)
                out[name] = json.loads(stdout.strip().splitlines()[-1]) if proc.returncode == 0 else \
                    {"error": f"exit {proc.returncode}: {stderr[-400:]}"}
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate(timeout=10)
                out[name] = {"error": "timed out after 40 s"}
            except (ValueError, IndexError) as exc:
                out[name] = {"error": f"no report: {exc}"}
        return out

    def _redirected(self, peer: Peer) -> int | None:
        if peer.agent is None:
            return None
        return int(self.admin("/status", peer.agent)["counters"]["connect4"]["redirected"])

    def check_peer(self, peer: Peer) -> str | None:
        """None when the peer can be measured; else why not (its agent died: an
        experimental engine's agent may; that fails its samples, not the run)."""
        if peer.broken is None and peer.agent is not None and peer.engine != "userspace":
            assert peer.agent.agent is not None
            rc = peer.agent.agent.poll()
            if rc is not None:
                peer.broken = f"its agent (--l4-engine {peer.engine}) exited with {rc}: " + " ".join(
                    peer.agent.log_text()[-600:].split())
        return peer.broken

    def assert_alive(self) -> None:
        """Stop the run (rather than record garbage) if a server, an HAProxy or the
        userspace agent died. A further engine's agent dying only fails its samples."""
        procs = dict(self.servers)
        for peer in self.peers.values():
            if peer.engine not in (None, "userspace"):
                continue
            for i, p in enumerate(peer.proxies):
                procs[f"{peer.name} proxy {i}"] = p
        dead = [f"{name} (pid {p.pid}, exit {p.returncode})" for name, p in procs.items()
                if p.poll() is not None]
        if dead:
            hint = f"\nagent log tail:\n{self.sc.log_text()[-1500:]}" if any(
                "nodemesh" in d for d in dead) else ""
            raise RuntimeError("exited during the run: " + ", ".join(dead) + hint)

    # -- the agents ------------------------------------------------------------
    def admin(self, endpoint: str, agent: Scenario | None = None) -> Any:
        """An agent's admin API (default: the userspace one), read in-process (no CLI
        process per poll: less noise on a 2-core machine)."""
        from agent.instance import Instance
        from nodemesh.admin_client import get
        from nodemesh.errors import UserError

        try:
            return get(Instance((agent or self.sc).instance).admin_socket, endpoint)
        except UserError as exc:
            raise RuntimeError(str(exc)) from None

    def agent_process(self) -> psutil.Process:
        assert self.sc.agent is not None
        return psutil.Process(self.sc.agent.pid)

    def stop_engine_agents(self) -> None:
        """Stop every agent but the userspace one (the memory scenario measures that
        one alone: the others would parse the same manifests meanwhile)."""
        for e, agent in self.agents.items():
            if e != "userspace":
                with contextlib.suppress(Exception):
                    agent.stop_agent()
                peer = self.peers.get(ENGINE_PEERS[e])
                if peer is not None:
                    peer.broken = peer.broken or "its agent was stopped (memory scenario)"

    def stop(self) -> None:
        for agent in self.agents.values():
            with contextlib.suppress(Exception):
                agent.stop_agent()

    def copy_logs(self, raw: Path) -> None:
        for e, agent in self.agents.items():
            with contextlib.suppress(OSError):
                (raw / ("agent.log" if e == "userspace" else f"agent-{e}.log")).write_text(agent.log_text())

    def agent_argvs(self) -> dict[str, list[str]]:
        return {e: a.agent_argv() for e, a in self.agents.items()}

    def scratch_paths(self) -> list[Path]:
        return [self.sc.dir, *(a.agent_log for a in self.agents.values())]
