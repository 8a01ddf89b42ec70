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


def nginx_conf(workdir: str, port: int, h2_port: int | None = None) -> str:
    """One nginx worker, no logs, a 1 KiB body on /1k and a 3-byte one on /tiny; the same
    locations over cleartext HTTP/2 with prior knowledge (h2c, ``listen ... http2`` without
    TLS: nginx then speaks only HTTP/2 on that port) on ``h2_port``."""
    body = ("nodemesh-bench-" * 80)[:HTTP_BODY_BYTES]
    assert len(body) == HTTP_BODY_BYTES
    # keepalive_requests bounds HTTP/2 connections too (nginx >= 1.19.7): h2load's
    # connections must not be closed under it mid-sample.
    h2_listen = f"\n        listen {h2_port} http2 backlog=4096;" if h2_port else ""
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
        listen {port} backlog=4096;{h2_listen}
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


# How HAProxy forwards one service port: "tcp" (mode tcp), "h1" (mode http, HTTP/1.1 to the
# server) or "h2" (mode http, HTTP/2 to the server: ``proto h2``, which gRPC needs). In mode
# http a cleartext bind takes HTTP/1.1 and, on its connection preface, HTTP/2 (h2c with prior
# knowledge) alike.
L7_MODES = ("h1", "h2")


def _haproxy_server(upstream: str, mode: str) -> str:
    return f"    server s1 {upstream}" + (" proto h2" if mode == "h2" else "")


def haproxy_sidecar_conf(listen: str, routes: dict[int, str], http_listen: str | None = None,
                         http_routes: dict[int, tuple[str, str]] | None = None) -> str:
    """A classic sidecar: ONE capture listener (what iptables REDIRECT sends
    everything to), routing on the ORIGINAL destination port, which HAProxy
    reads with SO_ORIGINAL_DST (``dst_port``), as Envoy's 15001 does.

    ``routes``: original destination port -> upstream ``ip:port`` (mode tcp).
    ``http_routes``: original destination port -> (upstream, "h1" or "h2"),
    served in mode http on a second capture listener ``http_listen`` (HAProxy
    has no per-connection switch from a tcp frontend by port that keeps both
    paths as plain as Envoy's filter chains, so the iptables rules of the L7
    ports REDIRECT there).
    """
    lines = [HAPROXY_GLOBAL, "frontend capture", f"    bind {listen}"]
    for port in sorted(routes):
        lines.append(f"    use_backend be_{port} if {{ dst_port {port} }}")
    for port, upstream in sorted(routes.items()):
        lines += [f"backend be_{port}", f"    server s1 {upstream}"]
    if http_routes:
        assert http_listen is not None
        lines += ["frontend capture_http", "    mode http", f"    bind {http_listen}"]
        for port in sorted(http_routes):
            lines.append(f"    use_backend be_{port} if {{ dst_port {port} }}")
        for port, (upstream, mode) in sorted(http_routes.items()):
            assert mode in L7_MODES, mode
            lines += [f"backend be_{port}", "    mode http", _haproxy_server(upstream, mode)]
    return "\n".join(lines) + "\n"


def haproxy_node_conf(listeners: dict[str, str | tuple[str, str]]) -> str:
    """A node proxy reached by DNAT from other netns: the original destination
    is not recoverable there (the conntrack entry lives in the client pod's
    netns), so, as kube-proxy's userspace mode did, it has one listener per
    service port. ``listeners``: ``bind ip:port`` -> upstream ``ip:port``
    (mode tcp) or (upstream, "tcp" | "h1" | "h2")."""
    lines = [HAPROXY_GLOBAL]
    for i, (bind, target) in enumerate(sorted(listeners.items())):
        upstream, mode = (target, "tcp") if isinstance(target, str) else target
        lines += [f"listen svc_{i}", f"    bind {bind}"]
        if mode != "tcp":
            assert mode in L7_MODES, mode
            lines.append("    mode http")
        lines.append(_haproxy_server(upstream, mode))
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


# -- h2load (HTTP/2 and gRPC) ------------------------------------------------------

def grpc_frame(message: bytes) -> bytes:
    """One gRPC length-prefixed message (uncompressed): what h2load posts with ``-d``."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


GRPC_HEADERS = ("content-type: application/grpc", "te: trailers")


def h2load_argv(url: str, seconds: int, clients: int, streams: int, log_file: str,
                data: str | None = None, headers: tuple[str, ...] = ()) -> list[str]:
    """h2load for ``seconds`` (timing-based run), ``clients`` connections with up to
    ``streams`` concurrent streams each, one thread; cleartext URLs are h2c with prior
    knowledge. ``--log-file`` gets one line per request (start, status, duration),
    which is where the percentiles come from (h2load itself prints only min, max,
    mean and sd). ``data``: a file to POST (gRPC)."""
    argv = ["h2load", "-D", str(int(seconds)), "-c", str(clients), "-m", str(streams), "-t", "1",
            "--log-file", log_file]
    if data is not None:
        argv += ["-d", data]
    for h in headers:
        argv += ["-H", h]
    return argv + [url]


_H2_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6}


def _h2_time_us(text: str) -> float:
    m = re.fullmatch(r"([0-9.]+)(us|ms|s)", text)
    if not m:
        raise ValueError(f"h2load: not a duration: {text!r}")
    return float(m.group(1)) * _H2_UNITS[m.group(2)]


def percentile(sorted_values: list[float], q: float) -> float:
    """The q-th percentile (0-100) of sorted values, nearest rank (as wrk and sockperf)."""
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, -(-len(sorted_values) * q // 100))   # ceil(n * q / 100), at least 1
    return sorted_values[int(min(rank, len(sorted_values))) - 1]


def parse_h2load_log(text: str) -> dict[str, Any]:
    """h2load's ``--log-file``: ``<start µs since epoch>\\t<status>\\t<duration µs>`` per
    finished request. Latency percentiles (µs) and the status codes seen."""
    durations: list[float] = []
    statuses: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) != 3:
            continue
        statuses[parts[1]] = statuses.get(parts[1], 0) + 1
        durations.append(float(parts[2]))
    if not durations:
        raise ValueError("h2load logged no finished request")
    durations.sort()
    lat: dict[str, float] = {"min": durations[0], "p50": percentile(durations, 50),
                             "p90": percentile(durations, 90), "p99": percentile(durations, 99),
                             "p999": percentile(durations, 99.9), "max": durations[-1]}
    lat = {k: int(v) if v.is_integer() else v for k, v in lat.items()}
    lat["mean"] = round(sum(durations) / len(durations), 1)
    return {"latency_us": lat, "logged": len(durations), "statuses": statuses}


def parse_h2load(out: str, log_text: str | None = None) -> dict[str, Any]:
    """h2load's summary (and, given, its per-request log for percentiles)."""
    fin = re.search(r"^finished in ([0-9.]+(?:us|ms|s)), ([0-9.]+) req/s", out, re.M)
    req = re.search(r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                    r"(\d+) failed, (\d+) errored, (\d+) timeout", out, re.M)
    codes = re.search(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out, re.M)
    traffic = re.search(r"^traffic: .*?\((\d+)\) total, .*?\((\d+)\) headers.*?, .*?\((\d+)\) data",
                        out, re.M)
    if not (fin and req and codes and traffic):
        raise ValueError("h2load printed no summary")
    proto = re.search(r"^Application protocol: (\S+)", out, re.M)
    rtime = re.search(r"^time for request:\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", out, re.M)
    total, started, done, ok, failed, errored, timeout = (int(x) for x in req.groups())
    res: dict[str, Any] = {
        "seconds": round(_h2_time_us(fin.group(1)) / 1e6, 3),
        "requests_per_second": float(fin.group(2)),
        "requests": done, "succeeded": ok, "started": started,
        "failed": failed, "errored": errored, "timeout": timeout,
        "status": {"2xx": int(codes.group(1)), "3xx": int(codes.group(2)),
                   "4xx": int(codes.group(3)), "5xx": int(codes.group(4))},
        "bytes": {"total": int(traffic.group(1)), "headers": int(traffic.group(2)),
                  "data": int(traffic.group(3))},
        "protocol": proto.group(1) if proto else None,
    }
    if rtime:
        res["request_time_us"] = {k: _h2_time_us(v) for k, v in
                                  zip(("min", "max", "mean", "sd"), rtime.groups(), strict=True)}
    if log_text is not None:
        res.update(parse_h2load_log(log_text))
    return res


def h2load_problems(m: dict[str, Any], data_bytes_per_response: int | None = None) -> list[str]:
    """Why an h2load sample does not count: failures, non-2xx answers, not h2c, or (for
    gRPC, whose errors are HTTP 200 with a grpc-status trailer and, for the sandbox's
    server, no message) responses without the expected DATA bytes."""
    bad = []
    if m["protocol"] not in (None, "h2c"):
        bad.append(f"protocol {m['protocol']}, not h2c")
    if m["failed"] or m["errored"] or m["timeout"]:
        bad.append(f"{m['failed']} failed, {m['errored']} errored, {m['timeout']} timed out")
    non2xx = m["status"]["3xx"] + m["status"]["4xx"] + m["status"]["5xx"]
    if non2xx:
        bad.append(f"{non2xx} responses not 2xx: {m['status']}")
    if m["succeeded"] == 0:
        bad.append("no request succeeded")
    if data_bytes_per_response is not None and m["bytes"]["data"] != m["succeeded"] * data_bytes_per_response:
        bad.append(f"{m['bytes']['data']} DATA bytes for {m['succeeded']} responses, expected "
                   f"{data_bytes_per_response} each (a gRPC error carries no message)")
    return bad


# -- the byte-exact check (bench/integrity.py) ----------------------------------------

INTEGRITY_FAILURES = ("stalled", "error", "truncated", "wrong_bytes", "no_trailer")


def integrity_failure(flow: dict[str, Any], size: int) -> str | None:
    """How a flow of bench/integrity.py failed: stalled (no progress, or unfinished at the
    deadline), error (connect failed, reset), truncated (EOF before every byte came back),
    wrong_bytes (all came back, changed), no_trailer (the bytes right, the echo's
    after-EOF trailer missing or wrong); None when it passed."""
    if flow.get("ok"):
        return None
    err = str(flow.get("error", ""))
    if err.startswith("stalled"):
        return "stalled"
    if err:
        return "error"
    if flow.get("echoed", 0) < size:
        return "truncated"
    if not flow.get("match"):
        return "wrong_bytes"
    return "no_trailer"


def parse_integrity(out: str) -> dict[str, Any]:
    """The JSON line of bench/integrity.py: flows, how many passed, how the others failed."""
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if not lines:
        raise ValueError("the integrity client printed no report")
    d = json.loads(lines[-1])
    flows, size = d["flows"], d["size"]
    kinds = {k: 0 for k in INTEGRITY_FAILURES}
    bad = []
    for f in flows:
        kind = integrity_failure(f, size)
        if kind:
            kinds[kind] += 1
            bad.append({"failure": kind, **f})
    return {"flows": len(flows), "ok_flows": len(flows) - len(bad), "bad_flows": len(bad),
            "failures": kinds, "bytes_each_way": size * len(flows), "size": size,
            "seconds": d["seconds"], "bad": bad[:8]}


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
    Version("h2load", ("h2load", "--version"), r"nghttp2/(\S+)"),
)
