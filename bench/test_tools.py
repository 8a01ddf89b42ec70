"""Checks of the benchmark's parsers and config writers, no sandbox needed:
``.venv/bin/python -m pytest bench/test_tools.py`` (not in the default test
run, which only collects tests/)."""

from __future__ import annotations

import json

import pytest

from bench import report, tools
from bench.scenarios import filler_haproxy_conf, filler_services

SOCKPERF = """\
sockperf: \x1b[2;35m== version #3.7-no.git == \x1b[0m
sockperf: [Total Run] RunTime=3.000 sec; Warm up time=400 msec; SentMessages=50469; ReceivedMessages=50468
sockperf: ========= Printing statistics for Server No: 0
sockperf: [Valid Duration] RunTime=2.550 sec; SentMessages=43614; ReceivedMessages=43614
sockperf: \x1b[2;35m====> avg-rtt=58.373 (std-dev=28.150)\x1b[0m
sockperf: ---> <MAX> observation = 3011.915
sockperf: ---> percentile 99.999 = 3011.915
sockperf: ---> percentile 99.990 = 1293.996
sockperf: ---> percentile 99.900 =  222.270
sockperf: ---> percentile 99.000 =   85.945
sockperf: ---> percentile 90.000 =   67.544
sockperf: ---> percentile 75.000 =   61.911
sockperf: ---> percentile 50.000 =   56.455
sockperf: ---> percentile 25.000 =   52.880
sockperf: ---> <MIN> observation =   26.320
"""

WRK = """\
Running 2s test @ http://198.19.1.10:80/tiny
  1 threads and 16 connections
  5455 requests in 2.10s, 847.02KB read
Requests/sec:   2597.34
WRKJSON {"requests":5455,"duration_us":2100229,"bytes":867345,"errors":{"connect":0,"read":0,\
"write":0,"status":0,"timeout":0},"latency_us":{"min":1897,"mean":6215.5,"p50":5950,"p90":7040,\
"p99":13652,"p999":32205,"max":32365}}
"""


def test_sockperf() -> None:
    r = tools.parse_sockperf(SOCKPERF)
    assert r["rtt_us"]["p50"] == 56.455
    assert r["rtt_us"]["p99"] == 85.945
    assert r["rtt_us"]["mean"] == 58.373
    assert r["rtt_us"]["min"] == 26.32 and r["rtt_us"]["max"] == 3011.915
    assert r["observations"] == 43614
    with pytest.raises(ValueError):
        tools.parse_sockperf("sockperf: ERROR: Can`t connect socket")


def test_wrk() -> None:
    r = tools.parse_wrk(WRK)
    assert r["requests"] == 5455
    assert r["requests_per_second"] == pytest.approx(2597.3, abs=0.1)
    assert r["error_count"] == 0
    assert r["latency_us"]["p99"] == 13652
    with pytest.raises(ValueError):
        tools.parse_wrk("unable to connect to 198.19.1.10:80 Connection refused")


def test_iperf3() -> None:
    doc = {"end": {"sum_received": {"bits_per_second": 7.5e9, "bytes": 1875000000, "seconds": 2.0},
                   "sum_sent": {"bits_per_second": 7.6e9, "retransmits": 3},
                   "cpu_utilization_percent": {"host_total": 50.0, "remote_total": 40.0}}}
    r = tools.parse_iperf3(json.dumps(doc))
    assert r["gbit_per_second"] == 7.5 and r["retransmits"] == 3
    with pytest.raises(ValueError):
        tools.parse_iperf3(json.dumps({"error": "unable to connect to server"}))


def test_wrk_argv_whole_seconds() -> None:
    argv = tools.wrk_argv("http://x/1k", 3, 32, 1, "s.lua", close=True)
    assert argv[argv.index("-d") + 1] == "3s"
    assert "Connection: close" in argv


def test_haproxy_configs() -> None:
    side = tools.haproxy_sidecar_conf("127.0.0.1:15101", {80: "198.18.0.10:8080", 7: "198.18.0.10:7"})
    assert "bind 127.0.0.1:15101" in side and "nbthread 1" in side
    assert "use_backend be_80 if { dst_port 80 }" in side
    assert "server s1 198.18.0.10:8080" in side
    node = tools.haproxy_node_conf({"198.18.0.1:15113": "198.18.0.10:8080"})
    assert "bind 198.18.0.1:15113" in node and "mode tcp" in node


def test_nginx_body_is_1k() -> None:
    conf = tools.nginx_conf("/tmp/x", 8080)
    body = conf.split('location = /1k { return 200 "', 1)[1].split('"', 1)[0]
    assert len(body) == tools.HTTP_BODY_BYTES


def test_filler_services() -> None:
    docs, routes = filler_services(100, 1000)
    assert len(docs) == 200 and len(routes) == 100
    assert sum(len(v) for v in routes.values()) == 1000
    assert len({d["spec"]["clusterIP"] for d in docs if d["kind"] == "Service"}) == 100
    assert filler_haproxy_conf(routes).count("    server ") == 1000


def test_summary_ratios() -> None:
    def s(peer: str, p50: float) -> dict[str, object]:
        return {"scenario": "latency", "peer": peer, "round": 0, "ok": True,
                "metrics": {"rtt_us": {"p50": p50, "p99": p50 * 2}}}

    summ = report.summarize([s("direct", 20), s("nodemesh", 30), s("sidecar-haproxy", 50)])
    p50 = summ["rtt_p50"]["peers"]
    assert p50["nodemesh"]["ratio"] == 1.5 and p50["nodemesh"]["added"] == 10
    assert p50["sidecar-haproxy"]["ratio"] == 2.5
    assert "bulk_1" not in summ


H2LOAD = """\
starting benchmark...
spawning thread #0: 4 total client(s). Timing-based test with 0s of warm-up time and 1s of main \
duration for measurements.
Application protocol: h2c
Main benchmark duration is over for thread #0. Stopping all clients.

finished in 1.00s, 608.00 req/s, 61.16KB/s
requests: 608 total, 640 started, 608 done, 608 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 608 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 61.16KB (62632) total, 1.96KB (2004) headers (space savings 95.93%), 40.97KB (41952) data
                     min         max         mean         sd        +/- sd
time for request:    31.71ms     88.57ms     50.98ms     10.40ms    76.32%
time for connect:      111us       194us       159us        35us    75.00%
time to 1st byte:    51.25ms     76.94ms     64.82ms     10.75ms    50.00%
req/s           :     151.85      151.86      151.85        0.01    50.00%
"""


def test_h2load_summary() -> None:
    r = tools.parse_h2load(H2LOAD)
    assert r["requests_per_second"] == 608.0 and r["seconds"] == 1.0
    assert r["requests"] == 608 and r["succeeded"] == 608 and r["started"] == 640
    assert r["status"] == {"2xx": 608, "3xx": 0, "4xx": 0, "5xx": 0}
    assert r["bytes"] == {"total": 62632, "headers": 2004, "data": 41952}
    assert r["protocol"] == "h2c"
    assert r["request_time_us"]["min"] == pytest.approx(31710) and r["request_time_us"]["max"] == 88570
    # 608 gRPC replies of a 64-byte message, each framed in 5 bytes: 69 DATA bytes each
    assert tools.h2load_problems(r, 69) == []
    assert "DATA bytes" in tools.h2load_problems(r, 70)[0]
    with pytest.raises(ValueError):
        tools.parse_h2load("connect to 198.19.1.10 port 82 failed: Connection refused")


def test_h2load_problems() -> None:
    r = tools.parse_h2load(H2LOAD.replace("608 succeeded, 0 failed", "600 succeeded, 8 failed")
                           .replace("608 2xx, 0 3xx, 0 4xx, 0 5xx", "600 2xx, 0 3xx, 0 4xx, 8 5xx")
                           .replace("Application protocol: h2c", "Application protocol: http/1.1"))
    bad = " | ".join(tools.h2load_problems(r))
    assert "8 failed" in bad and "8 responses not 2xx" in bad and "not h2c" in bad


def test_h2load_log_percentiles() -> None:
    # <start µs>\t<status>\t<duration µs>, one line per finished request, in any order
    lines = [f"17953159577434{i:02d}\t200\t{d}" for i, d in enumerate(range(100, 0, -1))]
    r = tools.parse_h2load_log("\n".join(lines) + "\n")
    lat = r["latency_us"]
    assert (lat["min"], lat["p50"], lat["p90"], lat["p99"], lat["max"]) == (1, 50, 90, 99, 100)
    assert lat["mean"] == 50.5 and r["logged"] == 100 and r["statuses"] == {"200": 100}
    both = tools.parse_h2load(H2LOAD, "\n".join(lines))
    assert both["latency_us"]["p99"] == 99 and both["requests"] == 608
    with pytest.raises(ValueError):
        tools.parse_h2load_log("")


def test_percentile_nearest_rank() -> None:
    assert tools.percentile([5.0], 99) == 5.0
    assert tools.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert tools.percentile([1.0, 2.0, 3.0, 4.0], 75.1) == 4.0


def test_grpc_frame_and_argv() -> None:
    assert tools.grpc_frame(b"abc") == b"\x00\x00\x00\x00\x03abc"
    argv = tools.h2load_argv("http://198.19.1.10:50051/s/M", 3, 4, 8, "/tmp/log", data="/tmp/body",
                             headers=tools.GRPC_HEADERS)
    assert argv[:3] == ["h2load", "-D", "3"] and argv[-1] == "http://198.19.1.10:50051/s/M"
    assert argv[argv.index("-d") + 1] == "/tmp/body" and "te: trailers" in argv


def test_haproxy_l7_configs() -> None:
    side = tools.haproxy_sidecar_conf("127.0.0.1:15101", {80: "198.18.0.10:8080"}, "127.0.0.1:15102",
                                      {81: ("198.18.0.10:8080", "h1"), 50051: ("198.18.0.10:50051", "h2")})
    l7 = side.split("frontend capture_http", 1)[1]
    assert "mode http" in l7 and "bind 127.0.0.1:15102" in l7
    assert "use_backend be_50051 if { dst_port 50051 }" in l7
    assert "server s1 198.18.0.10:50051 proto h2" in l7
    assert "be_80" not in l7   # the L4 port stays on the mode tcp capture listener
    node = tools.haproxy_node_conf({"198.18.0.1:15113": "198.18.0.10:8080",
                                    "198.18.0.1:15116": ("198.18.0.10:8081", "h2")})
    blocks = node.split("listen ")[1:]
    assert "mode http" not in blocks[0] and "mode http" in blocks[1] and "proto h2" in blocks[1]


def test_nginx_h2c_listener() -> None:
    conf = tools.nginx_conf("/tmp/x", 8080, 8081)
    assert "listen 8081 http2" in conf and "listen 8080 backlog" in conf
    assert "http2" not in tools.nginx_conf("/tmp/x", 8080)


def _flow(i: int, size: int, **kw: object) -> dict[str, object]:
    ok = {"flow": i, "sent": size, "echoed": size, "ok": True, "match": True, "trailer_ok": True}
    return {**ok, **kw}


def test_integrity_report() -> None:
    size = 1000
    flows = [_flow(0, size),
             _flow(1, size, ok=False, echoed=300, match=False, trailer_ok=False,
                   error="stalled: no progress for 8s (sending)"),
             _flow(2, size, ok=False, echoed=700, match=False, trailer_ok=False),
             _flow(3, size, ok=False, match=False, trailer_ok=True),
             _flow(4, size, ok=False, trailer_ok=False, trailer=""),
             _flow(5, size, ok=False, echoed=0, error="ConnectionResetError: reset (sending)")]
    out = "noise\n" + json.dumps({"target": "x:7", "flows": flows, "size": size, "seconds": 1.5})
    r = tools.parse_integrity(out)
    assert r["flows"] == 6 and r["ok_flows"] == 1 and r["bad_flows"] == 5
    assert r["failures"] == {"stalled": 1, "error": 1, "truncated": 1, "wrong_bytes": 1, "no_trailer": 1}
    assert r["bytes_each_way"] == 6000 and [b["failure"] for b in r["bad"]][:2] == ["stalled", "truncated"]
    with pytest.raises(ValueError):
        tools.parse_integrity("Traceback (most recent call last):")


def _decision_samples(engines: dict[str, tuple[float, ...]], l4_failed: str = "") -> list[dict]:
    """Per engine: (RTT p50 µs, 1-stream Gbit/s, integrity ok[, new connections/s])."""
    samples: list[dict] = []
    for e, (p50, gbit, integ_ok, *rest) in engines.items():
        peer = report.ENGINE_PEERS[e]
        conns = rest[0] if rest else 1000.0
        samples.append({"scenario": "connrate", "peer": peer, "round": 0, "ok": True,
                        "metrics": {"requests_per_second": conns}})
        samples.append({"scenario": "latency", "peer": peer, "round": 0, "ok": True,
                        "metrics": {"rtt_us": {"p50": p50, "p99": p50 * 3}}})
        samples.append({"scenario": "bulk-1", "peer": peer, "round": 0, "ok": peer != l4_failed,
                        "metrics": {"gbit_per_second": gbit},
                        **({"error": "stalled: iperf3 did not finish"} if peer == l4_failed else {})})
        failures = dict.fromkeys(tools.INTEGRITY_FAILURES, 0)
        failures["truncated"] = 0 if integ_ok else 2
        samples.append({"scenario": "integrity", "peer": peer, "round": 0, "ok": integ_ok,
                        "metrics": {"flows": 16, "ok_flows": 16 if integ_ok else 14, "failures": failures,
                                    "mib_per_second": 100.0}})
    return samples


def _decide(samples: list[dict], engines: dict[str, dict] | None = None) -> dict:
    results = {"samples": samples, "summary": report.summarize(samples), "mode": "full",
               "params": {"rounds": 3}, "engines": engines or {}}
    return report.decide(results)


def test_decision_best_on_both_wins() -> None:
    d = _decide(_decision_samples({"userspace": (40, 6.0, True), "sockmap": (30, 4.0, True),
                                   "splice": (35, 8.0, True)}))
    assert d["chosen"] == "splice"   # (40/35) x (8/6) = 1.52 beats sockmap's (40/30) x (4/6) = 0.89
    assert d["engines"]["splice"]["score"] == pytest.approx(1.524, abs=0.001)
    assert d["engines"]["userspace"]["score"] == 1.0


def test_decision_counts_the_cost_of_new_connections() -> None:
    """Even latency and bulk, but half the connection rate: the default stays."""
    d = _decide(_decision_samples({"userspace": (40, 6.0, True, 4000.0),
                                   "splice": (38, 6.2, True, 2000.0)}))
    assert d["chosen"] == "userspace"
    assert d["engines"]["splice"]["connection_gain"] == 0.5
    assert d["engines"]["splice"]["score"] == pytest.approx(40 / 38 * 6.2 / 6.0 * 0.5, abs=0.001)
    assert "new conn/s" in "\n".join(report._decision_md(d))


def test_decision_needs_integrity_and_no_stall() -> None:
    d = _decide(_decision_samples({"userspace": (40, 6.0, True), "sockmap": (10, 20.0, False),
                                   "splice": (20, 12.0, True)}, l4_failed="nodemesh-splice"))
    assert d["chosen"] == "userspace"
    assert d["engines"]["sockmap"]["status"] == "disqualified"
    assert "2 truncated" in d["engines"]["sockmap"]["why"]
    assert "failed L4 traffic sample" in d["engines"]["splice"]["why"]


def test_decision_margin_keeps_the_default() -> None:
    d = _decide(_decision_samples({"userspace": (40, 6.0, True), "splice": (39, 6.1, True)}),
                {"sockmap": {"left_out": "not offered by this nodemesh agent"}})
    assert d["chosen"] == "userspace" and "not by more than 5%" in d["why"]
    assert d["engines"]["sockmap"] == {"peer": "nodemesh-sockmap", "status": "no data",
                                       "why": "not offered by this nodemesh agent"}


def test_decision_without_data() -> None:
    d = _decide([])
    assert d["chosen"] is None and all(r["status"] == "no data" for r in d["engines"].values())
    assert "none" in "\n".join(report._decision_md(d))
