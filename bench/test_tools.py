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
