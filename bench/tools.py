"""The load tools and servers the benchmark drives, and the parsers of what
they print. Pure functions here (configs in, text out; text in, numbers out),
so that they can be checked without a sandbox (see ``bench/test_tools.py``).

Every process is started by the caller through ``Place.spawn`` (tracked by
the sandbox, ended by pid); nothing here starts one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

# -- servers -------------------------------------------------------------------

HTTP_BODY_BYTES = 1024
TINY_BODY = "ok\n"


def nginx_conf(workdir: str, port: int) -> str:
    """One nginx worker, no logs, a 1 KiB body on /1k and a 3-byte one on /tiny."""
    body = ("nodemesh-bench-" * 80)[:HTTP_BODY_BYTES]
    assert len(body) == HTTP_BODY_BYTES
    return f"""# written by bench: one worker, no access log, everything in {workdir}
worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
worker_rlimit_nofile 16384;
events {{ worker_connections 8192; multi_accept on; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    default_type application/octet-stream;
    server {{
        listen {port} backlog=4096;
        location = /1k {{ return 200 "{body}"; }}
        location = /tiny {{ return 200 "{TINY_BODY.strip()}\\n"; }}
    }}
}}
"""


HAPROXY_GLOBAL = """\
global
    nbthread 1
    maxconn 8000
    # no logging, no stats: the cheapest faithful TCP forwarder
defaults
    mode tcp
    timeout connect 5s
    timeout client 120s
    timeout server 120s
"""


def haproxy_sidecar_conf(listen: str, routes: dict[int, str]) -> str:
    """A classic sidecar: ONE capture listener (what iptables REDIRECT sends
    everything to), routing on the ORIGINAL destination port, which HAProxy
    reads with SO_ORIGINAL_DST (``dst_port``), as Envoy's 15001 does.

    ``routes``: original destination port -> upstream ``ip:port``.
    """
    lines = [HAPROXY_GLOBAL, "frontend capture", f"    bind {listen}"]
    for port in sorted(routes):
        lines.append(f"    use_backend be_{port} if {{ dst_port {port} }}")
    for port, upstream in sorted(routes.items()):
        lines += [f"backend be_{port}", f"    server s1 {upstream}"]
    return "\n".join(lines) + "\n"


def haproxy_node_conf(listeners: dict[str, str]) -> str:
    """A node proxy reached by DNAT from other netns: the original destination
    is not recoverable there (the conntrack entry lives in the client pod's
    netns), so, as kube-proxy's userspace mode did, it has one listener per
    service port. ``listeners``: ``bind ip:port`` -> upstream ``ip:port``."""
    lines = [HAPROXY_GLOBAL]
    for i, (bind, upstream) in enumerate(sorted(listeners.items())):
        lines += [f"listen svc_{i}", f"    bind {bind}", f"    server s1 {upstream}"]
    return "\n".join(lines) + "\n"


# -- wrk -----------------------------------------------------------------------

# wrk's done() hook prints the exact counts and percentiles as one JSON line;
# only done() (and delay() for the paced run) are defined, so the per-request
# path stays in C.
WRK_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"min":%d,"mean":%.1f,"p50":%d,"p90":%d,"p99":%d,"p999":%d,"max":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), latency.max))
end
"""


def wrk_script(delay_ms: float | None = None) -> str:
    """The Lua for wrk: the JSON summary, and with ``delay_ms`` a pause before
    each request on each connection (closed-loop pacing: wrk has no open-loop
    rate; see the README's caveats)."""
    if delay_ms is None:
        return WRK_DONE
    return WRK_DONE + f"\ndelay = function()\n  return {delay_ms}\nend\n"


def wrk_argv(url: str, seconds: int, connections: int, threads: int, script: str,
             close: bool = False) -> list[str]:
    argv = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{int(seconds)}s",
            "--timeout", "5s", "-s", script]
    if close:
        argv += ["-H", "Connection: close"]
    return argv + [url]


def parse_wrk(out: str) -> dict[str, Any]:
    m = re.search(r"^WRKJSON (\{.*\})\s*$", out, re.M)
    if not m:
        raise ValueError("wrk printed no WRKJSON summary line")
    d = json.loads(m.group(1))
    seconds = d["duration_us"] / 1e6
    errors = sum(d["errors"].values())
    return {
        "requests": d["requests"],
        "seconds": round(seconds, 3),
        "requests_per_second": round(d["requests"] / seconds, 1) if seconds else 0.0,
        "bytes": d["bytes"],
        "errors": d["errors"],
        "error_count": errors,
        "latency_us": d["latency_us"],
    }


# -- sockperf ------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def sockperf_argv(host: str, port: int, seconds: int, msg_size: int) -> list[str]:
    return ["sockperf", "ping-pong", "--tcp", "-i", host, "-p", str(port),
            "-m", str(msg_size), "-t", str(int(seconds)), "--full-rtt"]


def parse_sockperf(out: str) -> dict[str, Any]:
    """Round-trip times (``--full-rtt``) in microseconds."""
    text = _ANSI.sub("", out)
    pct: dict[str, float] = {}
    for m in re.finditer(r"---> percentile\s+([0-9.]+)\s*=\s*([0-9.]+)", text):
        pct[m.group(1)] = float(m.group(2))
    mx = re.search(r"---> <MAX> observation\s*=\s*([0-9.]+)", text)
    mn = re.search(r"---> <MIN> observation\s*=\s*([0-9.]+)", text)
    avg = re.search(r"avg-rtt=([0-9.]+)", text)
    valid = re.search(r"\[Valid Duration\] RunTime=([0-9.]+) sec; SentMessages=(\d+); "
                      r"ReceivedMessages=(\d+)", text)
    if "50.000" not in pct or "99.000" not in pct or not valid:
        raise ValueError("sockperf printed no percentiles")
    seconds = float(valid.group(1))
    received = int(valid.group(3))
    return {
        "rtt_us": {"min": float(mn.group(1)) if mn else None,
                   "mean": float(avg.group(1)) if avg else None,
                   "p25": pct.get("25.000"), "p50": pct["50.000"], "p75": pct.get("75.000"),
                   "p90": pct.get("90.000"), "p99": pct["99.000"], "p999": pct.get("99.900"),
                   "max": float(mx.group(1)) if mx else None},
        "observations": received,
        "seconds": seconds,
        "round_trips_per_second": round(received / seconds, 1) if seconds else 0.0,
    }


# -- iperf3 --------------------------------------------------------------------

def iperf3_argv(host: str, port: int, seconds: int, streams: int) -> list[str]:
    return ["iperf3", "-c", host, "-p", str(port), "-t", str(int(seconds)), "-P", str(streams),
            "--json", "--connect-timeout", "3000"]


def parse_iperf3(out: str) -> dict[str, Any]:
    d = json.loads(out)
    if d.get("error"):
        raise ValueError(f"iperf3: {d['error']}")
    end = d["end"]
    recv = end["sum_received"]
    sent = end["sum_sent"]
    cpu = end.get("cpu_utilization_percent", {})
    return {
        "gbit_per_second": round(recv["bits_per_second"] / 1e9, 3),
        "sender_gbit_per_second": round(sent["bits_per_second"] / 1e9, 3),
        "bytes": recv["bytes"],
        "seconds": round(recv["seconds"], 3),
        "retransmits": sent.get("retransmits"),
        "client_cpu_percent": cpu.get("host_total"),
        "server_cpu_percent": cpu.get("remote_total"),
    }


# -- small helpers ---------------------------------------------------------------

@dataclass(frozen=True)
class Version:
    tool: str
    argv: tuple[str, ...]
    pattern: str


VERSIONS = (
    Version("haproxy", ("haproxy", "-v"), r"HA-?Proxy version (\S+)"),
    Version("iperf3", ("iperf3", "--version"), r"iperf (\S+)"),
    Version("wrk", ("wrk", "--version"), r"wrk (\S+)"),
    Version("nginx", ("nginx", "-v"), r"nginx/(\S+)"),
    Version("sockperf", ("sockperf", "--version"), r"version (\S+)"),
)
