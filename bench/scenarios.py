"""The measurements. Each traffic scenario runs every peer it concerns back to
back, in a rotated order each round, so that all peers see the same machine
state; each sample is bounded in time (the tool's own duration plus a
timeout, killed by pid past it) and in count (one tool run). A sample that
stalls (the experimental sockmap engine can hang a bulk flow) fails for that
peer and the run goes on.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from bench import tools
from bench.topology import (
    GRPC_MESSAGE,
    GRPC_METHOD,
    INTEGRITY_CLIENT,
    INTEGRITY_PEERS,
    L7_PEERS,
    PEERS,
    PY,
    SIDECAR_PORT,
    BenchNode,
    Peer,
    run,
    wait_listening,
)

Say = Callable[[str], None]


@dataclass(frozen=True)
class Params:
    mode: str
    rounds: int
    budget_seconds: float          # samples that would start later are skipped
    slack_seconds: float           # a sample's timeout: the tool's duration plus this
    latency_seconds: int           # whole seconds: wrk, sockperf, iperf3, h2load take no fractions
    latency_msg_bytes: int
    bulk_seconds: int
    bulk_streams: tuple[int, ...]
    connrate_seconds: int
    connrate_connections: int
    http_seconds: int
    http_connections: int
    paced_seconds: int
    paced_connections: int
    paced_delay_ms: float
    wrk_threads: int
    integrity_flows: int
    integrity_bytes: int
    integrity_idle_seconds: float  # no progress that long: the flow stalled
    integrity_deadline_seconds: float
    l7_seconds: int                # http-l7, h2, grpc
    h2_clients: int
    h2_streams: int
    memory_pods: tuple[int, ...]
    memory_services: tuple[tuple[int, int], ...]   # (services, endpoints)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


QUICK = Params(mode="quick", rounds=1, budget_seconds=104, slack_seconds=4,
               latency_seconds=1, latency_msg_bytes=64, bulk_seconds=1, bulk_streams=(1, 8),
               connrate_seconds=1, connrate_connections=16, http_seconds=1, http_connections=32,
               paced_seconds=1, paced_connections=4, paced_delay_ms=2, wrk_threads=1,
               integrity_flows=16, integrity_bytes=1 << 20, integrity_idle_seconds=4,
               integrity_deadline_seconds=12, l7_seconds=1, h2_clients=4, h2_streams=8,
               memory_pods=(10,), memory_services=((100, 1000),))
FULL = Params(mode="full", rounds=3, budget_seconds=840, slack_seconds=10,
              latency_seconds=5, latency_msg_bytes=64, bulk_seconds=4, bulk_streams=(1, 8),
              connrate_seconds=3, connrate_connections=16, http_seconds=5, http_connections=32,
              paced_seconds=3, paced_connections=4, paced_delay_ms=2, wrk_threads=1,
              integrity_flows=64, integrity_bytes=8 << 20, integrity_idle_seconds=8,
              integrity_deadline_seconds=60, l7_seconds=3, h2_clients=4, h2_streams=8,
              memory_pods=(10, 50, 100), memory_services=((100, 1000), (1000, 10000)))

SCENARIOS = ("latency", "bulk", "connrate", "http", "http-paced", "integrity", "http-l7", "h2",
             "grpc", "memory")
SCENARIO_HELP = {
    "latency": "sockperf TCP ping-pong, 64 B, one persistent connection: RTT p50/p99 (us)",
    "bulk": "iperf3, 1 and 8 streams: Gbit/s received",
    "connrate": "wrk with 'Connection: close' on a 3-byte body: new connections/s",
    "http": "wrk HTTP/1.1 keep-alive, 1 KiB body, 32 connections, on a port declared TCP (L4): "
            "req/s at saturation",
    "http-paced": "wrk keep-alive, 4 connections each pausing 2 ms between requests: latency at a "
                  "moderate load",
    "integrity": "F concurrent echo flows of S bytes with half-close through each L4 engine (and "
                 "direct): every byte back (SHA-256) and the trailer after the EOF",
    "http-l7": "wrk HTTP/1.1 keep-alive, 1 KiB, 32 connections, on a port named http-*: nodemesh's "
               "L7 path, HAProxy in mode http",
    "h2": "h2load, h2c prior knowledge to nginx, 4 connections x 8 streams, 1 KiB, on a port named "
          "http2-*",
    "grpc": "h2load gRPC unary (64 B Echo) to a grpcio server, 4 connections x 8 streams, on a port "
            "named grpc-*",
    "memory": "agent RSS with N enrolled pods and S services/E endpoints vs N HAProxy sidecars",
}
# Which peers each scenario measures (those of them in the run).
SCENARIO_PEERS: dict[str, tuple[str, ...]] = {
    **{sc: PEERS for sc in ("latency", "bulk", "connrate", "http", "http-paced")},
    "integrity": INTEGRITY_PEERS,
    **{sc: L7_PEERS for sc in ("http-l7", "h2", "grpc")},
    "memory": ("nodemesh",),
}


class Runner:
    def __init__(self, node: BenchNode, params: Params, raw: Path, say: Say, deadline: float) -> None:
        self.node = node
        self.p = params
        self.raw = raw
        self.say = say
        self.deadline = deadline
        self.samples: list[dict[str, Any]] = []
        self.memory: dict[str, Any] = {}
        self.grpc_checks: dict[str, Any] = {}
        self.workdir = node.workdir

    # -- one sample ------------------------------------------------------------
    def _sample(self, scenario: str, peer: Peer, rnd: int, argv: list[str], timeout: float,
                parse: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
        label = f"{scenario}/{peer.name}/r{rnd}"
        s: dict[str, Any] = {"scenario": scenario, "peer": peer.name, "round": rnd,
                             "argv": argv, "ok": False}
        if time.monotonic() > self.deadline:
            s["error"] = "skipped: over the mode's time budget"
            self.say(f"  {label:42s} skipped (time budget)")
            self.samples.append(s)
            return s
        broken = self.node.check_peer(peer)
        if broken is not None:
            s["error"] = f"not measured: {broken}"
            self.samples.append(s)
            return s
        rawfile = self.raw / f"{scenario}-{peer.name}-r{rnd}.txt"
        stats0 = self._agent_stats(peer)
        cpu0 = peer.proxy_cpu_seconds()
        mach0, sand0 = machine_cpu(), self._sandbox_cpu()
        s["started"] = time.time()
        res = run(peer.client, argv, timeout)
        cpu1 = peer.proxy_cpu_seconds()
        mach1, sand1 = machine_cpu(), self._sandbox_cpu()
        stats1 = self._agent_stats(peer)
        if stats0 is not None and stats1 is not None:
            # which path the agent took (relayed / http / http2 flows, the engine's own counters)
            s["agent_stats"] = {k: v - stats0.get(k, 0) for k, v in stats1.items() if v != stats0.get(k, 0)}
        busy = mach1["busy"] - mach0["busy"]
        s["machine_cpu"] = {"busy_seconds": round(busy, 3),
                            "steal_seconds": round(mach1["steal"] - mach0["steal"], 3),
                            "sandbox_seconds": round(sand1 - sand0, 3),
                            # CPU the run did not spend: other jobs on the machine, and
                            # kernel work not charged to the sandbox's cgroup
                            "outside_sandbox_seconds": round(max(0.0, busy - (sand1 - sand0)), 3)}
        rawfile.write_text(f"$ {shlex.join(argv)}\n# exit {res.returncode}, {res.seconds:.2f}s"
                           f"{' (TIMED OUT: killed)' if res.timed_out else ''}\n"
                           f"{res.stdout}\n--- stderr ---\n{res.stderr}")
        s["raw"] = str(rawfile.relative_to(self.raw.parent))
        s["wall_seconds"] = round(res.seconds, 3)
        if cpu0 is not None and cpu1 is not None:
            s["proxy_cpu_seconds"] = round(cpu1 - cpu0, 4)
        try:
            if res.timed_out:
                s["stalled"] = True
                raise ValueError(f"stalled: {argv[0]} did not finish within {timeout:.0f}s "
                                 f"(killed); output: {(res.stderr.strip() or res.stdout.strip())[-300:]}")
            if not res.ok:
                raise ValueError(res.describe())
            s["metrics"] = parse(res.stdout)
            s["ok"] = True
        except (ValueError, KeyError, OSError, json.JSONDecodeError) as exc:
            s["error"] = str(exc)[-600:]
        self.samples.append(s)
        return s

    def _rounds(self, scenario: str, one: Callable[[Peer, int], dict[str, Any]],
                group: str | None = None) -> None:
        """Every round, every peer of the scenario (``group``: whose peer list), rotated."""
        names = SCENARIO_PEERS[group or scenario]
        peers = [self.node.peers[n] for n in names if n in self.node.peers]
        for rnd in range(self.p.rounds):
            k = rnd % len(peers)
            for peer in peers[k:] + peers[:k]:   # rotate: no peer always goes first
                self.node.assert_alive()
                s = one(peer, rnd)
                self.say(f"  {scenario + '/' + peer.name + '/r' + str(rnd):42s} "
                         + (headline(s) if s.get("ok") else f"FAILED: {s.get('error', '')[:200]}"))

    # -- traffic scenarios ---------------------------------------------------------
    def latency(self) -> None:
        p = self.p

        def one(peer: Peer, rnd: int) -> dict[str, Any]:
            host, port = peer.target("latency")
            argv = tools.sockperf_argv(host, port, p.latency_seconds, p.latency_msg_bytes)
            # sockperf idles 2 s after connecting, before its warm-up and the test
            return self._sample("latency", peer, rnd, argv, p.latency_seconds + 2 + p.slack_seconds,
                                tools.parse_sockperf)

        self._rounds("latency", one)

    def bulk(self) -> None:
        p = self.p
        for streams in p.bulk_streams:
            name = f"bulk-{streams}"

            def one(peer: Peer, rnd: int, streams: int = streams, name: str = name) -> dict[str, Any]:
                host, port = peer.target("bulk")
                argv = tools.iperf3_argv(host, port, p.bulk_seconds, streams)
                s = self._sample(name, peer, rnd, argv, p.bulk_seconds + p.slack_seconds,
                                 tools.parse_iperf3)
                if s.get("ok") and s.get("proxy_cpu_seconds") is not None:
                    gib = s["metrics"]["bytes"] / 2**30
                    s["metrics"]["proxy_cpu_seconds_per_gib"] = round(s["proxy_cpu_seconds"] / gib, 4)
                if not s.get("ok") and "wall_seconds" in s:
                    self.node.start_iperf3()   # a failed test can leave the server busy
                return s

            self._rounds(name, one, group="bulk")

    def _wrk(self, scenario: str, path: str, seconds: float, connections: int, close: bool,
             delay_ms: float | None, per: str, service: str = "http") -> None:
        script = self.workdir / f"wrk-{scenario}.lua"
        script.write_text(tools.wrk_script(delay_ms))

        def one(peer: Peer, rnd: int) -> dict[str, Any]:
            argv = tools.wrk_argv(peer.url(path, service), seconds, connections, self.p.wrk_threads,
                                  str(script), close=close)
            s = self._sample(scenario, peer, rnd, argv, seconds + self.p.slack_seconds, tools.parse_wrk)
            m = s.get("metrics")
            if m is not None:
                if m["error_count"]:
                    s["ok"] = False
                    s["error"] = f"wrk counted errors: {m['errors']}"
                self._per_10k(s, per)
            return s

        self._rounds(scenario, one)

    @staticmethod
    def _per_10k(s: dict[str, Any], per: str) -> None:
        m = s["metrics"]
        if s.get("proxy_cpu_seconds") is not None and m["requests"]:
            m[f"proxy_cpu_seconds_per_10k_{per}"] = round(s["proxy_cpu_seconds"] / m["requests"] * 10_000, 4)

    def connrate(self) -> None:
        self._wrk("connrate", "/tiny", self.p.connrate_seconds, self.p.connrate_connections,
                  close=True, delay_ms=None, per="connections")

    def http(self) -> None:
        self._wrk("http", "/1k", self.p.http_seconds, self.p.http_connections,
                  close=False, delay_ms=None, per="requests")

    def http_paced(self) -> None:
        self._wrk("http-paced", "/1k", self.p.paced_seconds, self.p.paced_connections,
                  close=False, delay_ms=self.p.paced_delay_ms, per="requests")

    # -- the byte-exact check through each L4 engine -----------------------------------
    def integrity(self) -> None:
        p = self.p

        def one(peer: Peer, rnd: int) -> dict[str, Any]:
            host, port = peer.target("echo")
            argv = [PY, INTEGRITY_CLIENT, "--target", f"{host}:{port}", "--flows", str(p.integrity_flows),
                    "--size", str(p.integrity_bytes), "--idle", str(p.integrity_idle_seconds),
                    "--deadline", str(p.integrity_deadline_seconds)]
            s = self._sample("integrity", peer, rnd, argv,
                             p.integrity_deadline_seconds + p.slack_seconds, tools.parse_integrity)
            m = s.get("metrics")
            if m is not None:
                m["mib_per_second"] = round(2 * m["bytes_each_way"] / 2**20 / m["seconds"], 1) \
                    if m["seconds"] else None
                if m["bad_flows"]:
                    s["ok"] = False
                    kinds = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in m["failures"].items() if n)
                    s["error"] = (f"{m['bad_flows']}/{m['flows']} flows bad ({kinds}); first: "
                                  f"{json.dumps(m['bad'][0])[:300]}")
            return s

        self._rounds("integrity", one)

    def _agent_stats(self, peer: Peer) -> dict[str, int | float] | None:
        """A nodemesh peer's agent counters: its proxy (flows relayed, HTTP, HTTP/2), its L4
        engine's own (spliced, fallback...), its HTTP and HTTP/2 paths."""
        if peer.agent is None or peer.broken:
            return None
        try:
            st = self.node.admin("/status", peer.agent)
        except RuntimeError:
            return None
        out: dict[str, int | float] = {}
        for section in ("proxy", "splice", "http", "http2"):
            for k, v in (st.get(section) or {}).items():
                if isinstance(v, int | float) and not isinstance(v, bool):
                    out[f"{peer.engine if section == 'splice' else section}_{k}"] = v
        return out

    # -- L7 -------------------------------------------------------------------------------
    def http_l7(self) -> None:
        self._wrk("http-l7", "/1k", self.p.l7_seconds, self.p.http_connections,
                  close=False, delay_ms=None, per="requests", service="http-l7")

    def _h2load(self, scenario: str, service: str, path: str, data: Path | None = None,
                headers: tuple[str, ...] = (), data_bytes: int | None = None,
                refused: dict[str, str] | None = None) -> None:
        p = self.p

        def one(peer: Peer, rnd: int) -> dict[str, Any]:
            if refused and peer.name in refused:
                s = {"scenario": scenario, "peer": peer.name, "round": rnd, "ok": False,
                     "error": f"not measured: {refused[peer.name]}"}
                self.samples.append(s)
                return s
            log = self.workdir / f"h2load-{scenario}-{peer.name}-r{rnd}.log"
            log.unlink(missing_ok=True)
            argv = tools.h2load_argv(peer.url(path, service), p.l7_seconds, p.h2_clients, p.h2_streams,
                                     str(log), data=str(data) if data else None, headers=headers)

            def parse(out: str) -> dict[str, Any]:
                return tools.parse_h2load(out, log.read_text())

            s = self._sample(scenario, peer, rnd, argv, p.l7_seconds + p.slack_seconds, parse)
            log.unlink(missing_ok=True)   # one line per request: not kept
            m = s.get("metrics")
            if m is not None:
                problems = tools.h2load_problems(m, data_bytes)
                if problems:
                    s["ok"] = False
                    s["error"] = "; ".join(problems)
                self._per_10k(s, "requests")
            return s

        self._rounds(scenario, one)

    def h2(self) -> None:
        self._h2load("h2", "h2", "/1k", data_bytes=tools.HTTP_BODY_BYTES)

    def grpc(self) -> None:
        # Before and after the load: a real grpcio client through each peer gets grpc-status OK and
        # its message back (h2load sees HTTP statuses only; the DATA byte count per response is
        # its check that every call got a message, which a gRPC error has not).
        body = self.workdir / "grpc-request.bin"
        refused: dict[str, str] = {}
        peers = [self.node.peers[n] for n in L7_PEERS if n in self.node.peers]
        checks = self.node.grpc_unary_all(peers, calls=5)   # in parallel: a Python start each
        for peer in peers:
            res = checks[peer.name]
            codes = res.get("codes")
            exact = "results" in res and all(r.get("reply", {}).get("size") == len(GRPC_MESSAGE)
                                             for r in res["results"])
            self.grpc_checks[peer.name] = {"codes": codes, "replies_exact": exact}
            self.say(f"  {'grpc/' + peer.name + ' (grpcio check)':42s} codes {codes}, replies "
                     f"{'exact' if exact else 'WRONG'}")
            if codes != {"OK": 5} or not exact:
                refused[peer.name] = f"the grpcio check call failed: {str(res)[:400]}"
        self._h2load("grpc", "grpc", GRPC_METHOD, data=body, headers=tools.GRPC_HEADERS,
                     data_bytes=len(tools.grpc_frame(GRPC_MESSAGE)), refused=refused)

    # -- memory ----------------------------------------------------------------------
    def memory_scan(self) -> None:
        node, sb, m = self.node, self.node.sb, self.node.sc.manifests
        # The userspace agent alone: the others would parse every manifest below as well.
        node.stop_engine_agents()
        agent = node.agent_process()
        base_keys = [node.peers["nodemesh"].client.key]
        cfg = self.workdir / "haproxy-sidecar.cfg"   # the very config the sidecar peer runs
        pods: list[Any] = []
        sidecars: list[subprocess.Popen[Any]] = []
        rows: list[dict[str, Any]] = []
        row0 = {"pods": 0, "agent": mem(agent), "bpf_map_bytes": self._bpf_map_bytes()}
        rows.append(row0)
        self.say(f"  {'memory/pods=0':42s} agent RSS {mb(row0['agent']['rss'])}")
        for n in self.p.memory_pods:
            if time.monotonic() > self.deadline:
                self.say(f"  memory/pods={n}: skipped (time budget)")
                rows.append({"pods": n, "error": "skipped: over the mode's time budget"})
                continue
            t0 = time.monotonic()
            while len(pods) < n:
                pod = sb.add_pod(f"app-{len(pods)}", "mesh", {"app": "filler"})
                m.pod(pod)
                pods.append(pod)
            node.wait_enrolled(base_keys + [p.key for p in pods], timeout=60)
            time.sleep(0.5)   # one more reconcile tick; no traffic is running
            agent_mem = mem(agent)
            while len(sidecars) < n:
                pod = pods[len(sidecars)]
                with open(self.raw / "memory-sidecars.log", "a") as f:
                    sidecars.append(pod.spawn(["haproxy", "-db", "-f", str(cfg)], stdout=f,
                                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
            for pod, proc in zip(pods, sidecars, strict=True):
                wait_listening(pod, [SIDECAR_PORT], proc, timeout=20)
            side = [mem(psutil.Process(p.pid)) for p in sidecars]
            row = {"pods": n, "agent": agent_mem, "bpf_map_bytes": self._bpf_map_bytes(),
                   "sidecars": {k: sum(x[k] for x in side) for k in ("rss", "pss", "uss")},
                   "sidecar_each_rss_median": sorted(x["rss"] for x in side)[len(side) // 2],
                   "seconds": round(time.monotonic() - t0, 2)}
            rows.append(row)
            self.say(f"  {'memory/pods=' + str(n):42s} agent RSS {mb(agent_mem['rss'])}, "
                     f"{n} sidecars RSS {mb(row['sidecars']['rss'])} "
                     f"(USS {mb(row['sidecars']['uss'])})")
        self.memory["pods"] = rows
        if node.node_haproxy is not None:
            self.memory["node_haproxy"] = mem(psutil.Process(node.node_haproxy.pid))
        self.memory["services"] = self._memory_services(agent)

    def _memory_services(self, agent: psutil.Process) -> list[dict[str, Any]]:
        """Agent RSS as services/endpoints grow, and one sidecar HAProxy that
        carries the same table (every sidecar of the classic model does)."""
        node, m = self.node, self.node.sc.manifests
        rows = []
        base_services = len(node.admin("/status")["services"])
        for nsvc, neps in self.p.memory_services:
            if time.monotonic() > self.deadline:
                self.say(f"  memory/services={nsvc}: skipped (time budget)")
                rows.append({"services": nsvc, "endpoints": neps,
                             "error": "skipped: over the mode's time budget"})
                continue
            t0 = time.monotonic()
            docs, routes = filler_services(nsvc, neps)
            m.write("svc-filler.yaml", docs)
            want = nsvc + base_services
            deadline = time.monotonic() + 120
            stalls = 0
            while time.monotonic() < deadline:
                try:
                    st = node.admin("/status")
                except RuntimeError:
                    stalls += 1    # the agent's loop is busy parsing: that is data too
                    continue
                if len(st["services"]) >= want:
                    break
                time.sleep(0.25)
            else:
                raise RuntimeError(f"the agent did not load {nsvc} services within 120 s")
            loaded = time.monotonic() - t0
            time.sleep(0.5)
            agent_mem = mem(agent)
            cfg = self.workdir / f"haproxy-filler-{nsvc}.cfg"
            cfg.write_text(filler_haproxy_conf(routes))
            assert node.sb.node is not None
            with open(self.raw / "memory-services-haproxy.log", "a") as f:
                proc = node.sb.node.spawn(["haproxy", "-db", "-f", str(cfg)], stdout=f,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            wait_listening(node.sb.node, [SIDECAR_PORT], proc, timeout=30)
            hap = mem(psutil.Process(proc.pid))
            from sandbox.node import stop_processes
            stop_processes([proc], grace=3)
            row = {"services": nsvc, "endpoints": neps, "agent": agent_mem,
                   "bpf_map_bytes": self._bpf_map_bytes(), "sidecar_with_table": hap,
                   "agent_load_seconds": round(loaded, 2), "admin_timeouts_while_loading": stalls,
                   "seconds": round(time.monotonic() - t0, 2)}
            rows.append(row)
            self.say(f"  {f'memory/services={nsvc}/endpoints={neps}':42s} agent RSS {mb(agent_mem['rss'])}, "
                     f"one sidecar with that table RSS {mb(hap['rss'])}; the agent took "
                     f"{loaded:.1f}s to load it")
        m.remove("svc-filler.yaml")
        return rows

    def _sandbox_cpu(self) -> float:
        """CPU seconds charged to the run's cgroup subtree (pods, node, agent)."""
        try:
            for line in (self.node.sb.cgroup_root / "cpu.stat").read_text().splitlines():
                if line.startswith("usage_usec "):
                    return int(line.split()[1]) / 1e6
        except OSError:
            pass
        return 0.0

    def _bpf_map_bytes(self) -> int | None:
        """Kernel memory of the agent instance's pinned maps (bpftool's memlock)."""
        pin = f"/sys/fs/bpf/nodemesh/{self.node.sc.instance}/"
        try:
            out = subprocess.run(["bpftool", "-j", "-f", "map", "show"], capture_output=True,
                                 text=True, timeout=20, check=True).stdout
            maps = json.loads(out)
        except (OSError, subprocess.SubprocessError, ValueError):
            return None
        return sum(int(x.get("bytes_memlock", 0)) for x in maps
                   if any(str(p).startswith(pin) for p in x.get("pinned", [])))


# -- helpers -------------------------------------------------------------------------

def machine_cpu() -> dict[str, float]:
    t = psutil.cpu_times()
    idle = t.idle + getattr(t, "iowait", 0.0)
    steal = getattr(t, "steal", 0.0)
    return {"busy": sum(t) - idle - steal - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0),
            "steal": steal}


def mem(proc: psutil.Process) -> dict[str, int]:
    info = proc.memory_full_info()
    return {"rss": info.rss, "pss": info.pss, "uss": info.uss}


def mb(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def filler_services(nsvc: int, neps: int) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
    """``nsvc`` services with ``neps`` endpoints in all, as one multi-document
    file (written atomically, so the agent parses it once). Endpoints are plain
    addresses on the pod subnet: tables to hold, never to be connected to."""
    per = max(1, neps // nsvc)
    docs: list[dict[str, Any]] = []
    routes: dict[str, list[str]] = {}
    for i in range(nsvc):
        vip = f"198.19.{2 + i // 250}.{1 + i % 250}"
        name = f"filler-{i}"
        docs.append({"apiVersion": "v1", "kind": "Service",
                     "metadata": {"name": name, "namespace": "bench"},
                     "spec": {"clusterIP": vip, "ports": [{"name": "tcp-web", "port": 80,
                                                           "targetPort": 8080, "protocol": "TCP"}]}})
        eps = [f"198.18.0.{100 + (i + j) % 150}" for j in range(per)]
        docs.append({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                     "metadata": {"name": f"{name}-1", "namespace": "bench",
                                  "labels": {"kubernetes.io/service-name": name}},
                     "addressType": "IPv4",
                     "ports": [{"name": "tcp-web", "port": 8080, "protocol": "TCP"}],
                     "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in eps]})
        routes[vip] = [f"{ip}:8080" for ip in eps]
    return docs, routes


def filler_haproxy_conf(routes: dict[str, list[str]]) -> str:
    lines = [tools.HAPROXY_GLOBAL, "frontend capture", f"    bind 127.0.0.1:{SIDECAR_PORT}"]
    for i, vip in enumerate(routes):
        lines.append(f"    use_backend be_{i} if {{ dst {vip} }}")
    for i, servers in enumerate(routes.values()):
        lines.append(f"backend be_{i}")
        lines += [f"    server s{j} {addr}" for j, addr in enumerate(servers)]
    return "\n".join(lines) + "\n"


def headline(s: dict[str, Any]) -> str:
    m = s["metrics"]
    sc = s["scenario"]
    cpu = s.get("proxy_cpu_seconds")
    tail = f", proxy CPU {cpu:.2f}s" if cpu is not None else ""
    outside = s.get("machine_cpu", {}).get("outside_sandbox_seconds", 0.0)
    if s.get("wall_seconds") and outside / s["wall_seconds"] > 0.15:
        tail += f" [busy machine: {outside:.1f} CPU s outside the sandbox]"
    if sc == "integrity":
        return (f"{m['ok_flows']}/{m['flows']} flows byte-exact with half-close, "
                f"{m['mib_per_second']} MiB/s both ways{tail}")
    if sc == "latency":
        r = m["rtt_us"]
        return f"RTT p50 {r['p50']:.1f} us, p99 {r['p99']:.1f} us{tail}"
    if sc.startswith("bulk"):
        return f"{m['gbit_per_second']:.2f} Gbit/s{tail}"
    if sc == "connrate":
        return f"{m['requests_per_second']:.0f} conn/s{tail}"
    lat = m["latency_us"]
    return f"{m['requests_per_second']:.0f} req/s, p50 {lat['p50']} us, p99 {lat['p99']} us{tail}"
