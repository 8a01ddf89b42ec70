"""Istio-compatible telemetry (no root): metrics scraped over real HTTP from the aiohttp
endpoint on an ephemeral loopback port, access-log lines, and the x-request-id /
traceparent header rules."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dataplane.telemetry import (
    DEFAULT_BUCKETS,
    MAX_LABEL_LEN,
    TCP_LABELS,
    Peer,
    ResponseFlag,
    Telemetry,
    ensure_request_id,
    join_flags,
    propagate_traceparent,
)
from nodemesh.errors import UserError

# The label set of Istio's request metrics, as its docs and stats filter list them.
ISTIO_HTTP_LABELS = {
    "reporter",
    "source_workload", "source_workload_namespace", "source_principal", "source_app", "source_version",
    "source_canonical_service", "source_canonical_revision", "source_cluster",
    "destination_workload", "destination_workload_namespace", "destination_principal",
    "destination_app", "destination_version", "destination_service", "destination_service_name",
    "destination_service_namespace", "destination_canonical_service", "destination_canonical_revision",
    "destination_cluster",
    "request_protocol", "response_code", "grpc_response_status", "response_flags",
    "connection_security_policy",
}
ISTIO_TCP_LABELS = ISTIO_HTTP_LABELS - {"response_code", "grpc_response_status"}
# Envoy's default histogram bounds, which Istio's histograms use, as Envoy prints them.
ISTIO_LE = ["0.5", "1", "5", "10", "25", "50", "100", "250", "500", "1000", "2500", "5000", "10000",
            "30000", "60000", "300000", "600000", "1800000", "3600000", "+Inf"]

SLEEP = Peer.from_pod_labels("sleep", "default", {"app": "sleep", "version": "v1"},
                             service_account="sleep")
REVIEWS_V1 = Peer(workload="reviews-v1", namespace="bookinfo", app="reviews", version="v1",
                  cluster="Kubernetes")
REVIEWS_FQDN = "reviews.bookinfo.svc.cluster.local"
TCP_WORKLOAD_AT = TCP_LABELS.index("destination_workload")


def _request(t: Telemetry, **overrides: Any) -> None:
    """One request with sensible values; tests override what they look at."""
    args: dict[str, Any] = dict(
        request_protocol="http", response_code=200, grpc_response_status=None, response_flags="-",
        duration_s=0.012, request_bytes=11, response_bytes=222, method="GET", path="/reviews/1",
        authority="reviews:9080", upstream="10.1.0.7:9080", request_id="rid-1", traceparent=None)
    args.update(overrides)
    source = args.pop("source", SLEEP)
    destination = args.pop("destination", REVIEWS_V1)
    service = args.pop("destination_service", REVIEWS_FQDN)
    t.request(source, destination, service, **args)


def _run(fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(fn(), 30))


async def _get(port: int, path: str) -> tuple[int, str, str]:
    """A real HTTP GET (urllib, in a thread so the server on this loop can answer)."""
    def fetch() -> tuple[int, str, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
                return r.status, r.headers.get("Content-Type", ""), r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get("Content-Type", ""), e.read().decode()
    return await asyncio.to_thread(fetch)


def _scrape(t: Telemetry) -> dict[str, Any]:
    """Serve t's metrics on an ephemeral port, GET /metrics, parse it: name -> family."""
    out: dict[str, Any] = {}

    async def go() -> None:
        runner = await t.serve_metrics("127.0.0.1", 0)
        try:
            port = runner.addresses[0][1]
            status, ctype, body = await _get(port, "/metrics")
            assert status == 200
            assert ctype.startswith("text/plain") and "version=0.0.4" in ctype
            out["text"] = body
            out.update({f.name: f for f in text_string_to_metric_families(body)})
        finally:
            await runner.cleanup()

    _run(go)
    return out


def _samples(families: dict[str, Any], sample_name: str) -> list[Any]:
    """The samples called ``sample_name`` (``x_total``, ``x_bucket``...) of family ``x``."""
    family = re.sub(r"_(total|bucket|sum|count)$", "", sample_name)
    return [s for s in families[family].samples if s.name == sample_name]


# --- metrics -------------------------------------------------------------------

def test_request_metrics_have_istios_names_and_exact_label_set() -> None:
    t = Telemetry(access_log=lambda line: None)
    _request(t)
    fams = _scrape(t)

    for name in ("istio_requests", "istio_request_duration_milliseconds", "istio_request_bytes",
                 "istio_response_bytes"):
        assert name in fams
    assert fams["istio_requests"].type == "counter"
    assert "# TYPE istio_requests_total counter" in fams["text"]
    for name in ("istio_request_duration_milliseconds", "istio_request_bytes", "istio_response_bytes"):
        assert fams[name].type == "histogram"
    # No *_created series: an Istio proxy exports none, and they would double the series.
    assert "_created" not in fams["text"]

    (sample,) = _samples(fams, "istio_requests_total")
    assert set(sample.labels) == ISTIO_HTTP_LABELS
    assert sample.value == 1
    assert sample.labels == {
        "reporter": "source",
        "source_workload": "sleep", "source_workload_namespace": "default",
        "source_principal": "spiffe://cluster.local/ns/default/sa/sleep",
        "source_app": "sleep", "source_version": "v1", "source_canonical_service": "sleep",
        "source_canonical_revision": "v1", "source_cluster": "Kubernetes",
        "destination_workload": "reviews-v1", "destination_workload_namespace": "bookinfo",
        "destination_principal": "unknown", "destination_app": "reviews", "destination_version": "v1",
        "destination_service": REVIEWS_FQDN, "destination_service_name": "reviews",
        "destination_service_namespace": "bookinfo", "destination_canonical_service": "reviews",
        "destination_canonical_revision": "v1", "destination_cluster": "Kubernetes",
        "request_protocol": "http", "response_code": "200", "grpc_response_status": "",
        "response_flags": "-", "connection_security_policy": "unknown",
    }


def test_unknown_peers_get_istios_defaults() -> None:
    t = Telemetry(access_log=lambda line: None)
    _request(t, source=Peer(), destination=Peer(), destination_service="")
    (sample,) = _samples(_scrape(t), "istio_requests_total")
    for side in ("source", "destination"):
        assert sample.labels[f"{side}_canonical_revision"] == "latest"
        for label in ("workload", "workload_namespace", "principal", "app", "version",
                      "canonical_service", "cluster"):
            assert sample.labels[f"{side}_{label}"] == "unknown", label
    assert sample.labels["destination_service"] == "unknown"
    assert sample.labels["destination_service_name"] == "unknown"


def test_requests_total_counts_per_response_code_and_destination_service() -> None:
    t = Telemetry(access_log=lambda line: None)
    ratings = Peer(workload="ratings-v1", namespace="bookinfo", app="ratings", version="v1")
    for _ in range(7):
        _request(t)
    for _ in range(3):
        _request(t, response_code=503, response_flags="UO")
    for _ in range(5):
        _request(t, destination=ratings, destination_service="ratings.bookinfo.svc.cluster.local:9080")
    _request(t, response_code=0, response_flags="DC")  # client left before any response

    counts = {(s.labels["destination_service"], s.labels["response_code"], s.labels["response_flags"]):
              s.value for s in _samples(_scrape(t), "istio_requests_total")}
    assert counts == {
        (REVIEWS_FQDN, "200", "-"): 7,
        (REVIEWS_FQDN, "503", "UO"): 3,
        ("ratings.bookinfo.svc.cluster.local", "200", "-"): 5,  # port stripped from the host
        (REVIEWS_FQDN, "0", "DC"): 1,
    }


def test_histograms_use_istios_default_buckets() -> None:
    t = Telemetry(access_log=lambda line: None)
    _request(t, duration_s=0.010, request_bytes=0, response_bytes=1500)  # 10 ms sits on a bound
    _request(t, duration_s=0.0123, request_bytes=600, response_bytes=4_000_000_000)
    fams = _scrape(t)
    assert [float(b) for b in ISTIO_LE[:-1]] == [float(b) for b in DEFAULT_BUCKETS]

    def cumulative(name: str) -> dict[str, float]:
        return {s.labels["le"]: s.value for s in _samples(fams, f"{name}_bucket")}

    for name in ("istio_request_duration_milliseconds", "istio_request_bytes", "istio_response_bytes"):
        assert list(cumulative(name)) == ISTIO_LE, name
        assert _samples(fams, f"{name}_count")[0].value == 2

    duration = cumulative("istio_request_duration_milliseconds")
    assert (duration["5"], duration["10"], duration["25"]) == (0, 1, 2)  # le is inclusive
    assert _samples(fams, "istio_request_duration_milliseconds_sum")[0].value == pytest.approx(22.3)
    request_bytes = cumulative("istio_request_bytes")
    assert (request_bytes["0.5"], request_bytes["500"], request_bytes["1000"]) == (1, 1, 2)
    response_bytes = cumulative("istio_response_bytes")
    assert (response_bytes["3600000"], response_bytes["+Inf"]) == (1, 2)


def test_grpc_requests_carry_protocol_and_status() -> None:
    lines: list[str] = []
    t = Telemetry(access_log=lines.append)
    _request(t, request_protocol="grpc", grpc_response_status="14", response_code=200, path="/pkg.Svc/Call")
    (sample,) = _samples(_scrape(t), "istio_requests_total")
    assert sample.labels["request_protocol"] == "grpc"
    assert sample.labels["grpc_response_status"] == "14"
    record = json.loads(lines[0])
    assert (record["protocol"], record["grpc_status"]) == ("HTTP/2", "14")


def test_tcp_family_counts_connections_and_bytes() -> None:
    lines: list[str] = []
    t = Telemetry(access_log=lines.append)
    db = Peer(workload="mysql", namespace="data", app="mysql", version="8")

    ok = t.tcp_opened(SLEEP, db, "mysql.data.svc.cluster.local", upstream="10.2.0.3:3306",
                      downstream="10.1.0.9:40000")
    t.tcp_bytes(ok, sent_delta=100, received_delta=40)  # periodic report on a long connection
    t.tcp_bytes(ok, sent_delta=50, received_delta=10)
    t.tcp_closed(ok, sent=1000, received=60, duration_s=2.5)  # totals: only the rest is added
    t.tcp_closed(ok, sent=1000, received=60, duration_s=2.5)  # a second close counts nothing

    failed = t.tcp_opened(SLEEP, db, "mysql.data.svc.cluster.local")
    t.tcp_closed(failed, sent=0, received=0, response_flags=ResponseFlag.UPSTREAM_CONNECTION_FAILURE)

    fams = _scrape(t)
    (opened,) = _samples(fams, "istio_tcp_connections_opened_total")
    assert set(opened.labels) == ISTIO_TCP_LABELS
    assert opened.labels["request_protocol"] == "tcp"
    assert opened.labels["destination_service"] == "mysql.data.svc.cluster.local"
    assert opened.labels["destination_service_namespace"] == "data"
    assert opened.value == 2

    closed_samples = _samples(fams, "istio_tcp_connections_closed_total")
    assert {s.labels["response_flags"]: s.value for s in closed_samples} == {"-": 1, "UF": 1}
    assert all(set(s.labels) == ISTIO_TCP_LABELS for s in closed_samples)
    (sent,) = _samples(fams, "istio_tcp_sent_bytes_total")
    (received,) = _samples(fams, "istio_tcp_received_bytes_total")
    assert (sent.value, received.value) == (1000, 60)
    assert set(sent.labels) == ISTIO_TCP_LABELS

    # One line per closed connection, none for the no-op second close or for opens.
    assert len(lines) == 2
    first, second = map(json.loads, lines)
    assert first["kind"] == "tcp"
    assert (first["bytes_sent"], first["bytes_received"], first["duration"]) == (1000, 60, 2500)
    assert (first["upstream_host"], first["downstream_remote_address"]) == ("10.2.0.3:3306", "10.1.0.9:40000")
    assert first["response_flags"] == "-" and second["response_flags"] == "UF"
    assert first["method"] is None and first["response_code"] is None


# --- access log ------------------------------------------------------------------

def test_one_json_access_log_line_per_request_with_envoy_fields() -> None:
    lines: list[str] = []
    t = Telemetry(access_log=lines.append)
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    _request(t, method=b"POST", path="/reviews/1?x=1", response_code=503,
             response_flags="URX,UF", upstream="10.1.0.7:9080", request_id="rid-42", traceparent=tp,
             downstream="10.1.0.9:51000", upstream_cluster="outbound|9080||" + REVIEWS_FQDN,
             start_time=1_700_000_000.25, duration_s=0.0291)
    _request(t)
    assert len(lines) == 2
    assert all("\n" not in line for line in lines)

    record = json.loads(lines[0])
    assert record == {
        "kind": "http", "start_time": "2023-11-14T22:13:20.250Z", "method": "POST",
        "path": "/reviews/1?x=1", "protocol": "HTTP/1.1", "response_code": 503,
        "response_flags": "UF,URX",  # Envoy's order
        "grpc_status": None, "bytes_received": 11, "bytes_sent": 222, "duration": 29,
        "upstream_host": "10.1.0.7:9080", "upstream_cluster": "outbound|9080||" + REVIEWS_FQDN,
        "downstream_remote_address": "10.1.0.9:51000", "authority": "reviews:9080",
        "x_request_id": "rid-42", "traceparent": tp, "reporter": "source",
        "source_workload": "sleep", "source_namespace": "default", "destination_workload": "reviews-v1",
        "destination_namespace": "bookinfo", "destination_service": REVIEWS_FQDN,
    }
    assert list(json.loads(lines[1])) == list(record)  # every line has the same keys


def test_access_log_to_a_logger(caplog: pytest.LogCaptureFixture) -> None:
    t = Telemetry(access_log=logging.getLogger("test.access"))
    with caplog.at_level(logging.INFO, logger="test.access"):
        _request(t)
        _request(t)
    assert [json.loads(r.getMessage())["x_request_id"] for r in caplog.records] == ["rid-1", "rid-1"]


def test_a_logger_that_is_off_gets_no_lines_but_metrics_still_count(
        caplog: pytest.LogCaptureFixture) -> None:
    """With the access logger below INFO (`--log-level warning`) no line is built
    at all; the metrics are the same."""
    t = Telemetry(access_log=logging.getLogger("test.access.off"))
    db = Peer(workload="mysql", namespace="data")
    with caplog.at_level(logging.WARNING, logger="test.access.off"):
        _request(t)
        conn = t.tcp_opened(SLEEP, db, "mysql.data.svc.cluster.local")
        t.tcp_closed(conn, sent=10, received=4)
        failed = t.tcp_opened(SLEEP, db, "mysql.data.svc.cluster.local")
        t.tcp_closed(failed, sent=0, received=0, response_flags=ResponseFlag.UPSTREAM_CONNECTION_FAILURE)
    assert not caplog.records
    fams = _scrape(t)
    assert [s.value for s in _samples(fams, "istio_requests_total")] == [1]
    closed = _samples(fams, "istio_tcp_connections_closed_total")
    assert {s.labels["response_flags"]: s.value for s in closed} == {"-": 1, "UF": 1}
    (sent,) = _samples(fams, "istio_tcp_sent_bytes_total")
    assert sent.value == 10


def test_label_values_are_remembered_within_a_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """Label tuples are derived once per peer/service combination; the memo starts
    over when full, and every connection still gets its own peers' labels."""
    import dataplane.telemetry as telemetry_module

    monkeypatch.setattr(telemetry_module, "_LABEL_MEMO_MAX", 2)
    t = Telemetry(access_log=lambda line: None)
    dbs = [Peer(workload=f"db-{i}", namespace="data") for i in range(5)]
    for db in dbs * 2:
        conn = t.tcp_opened(SLEEP, db, f"{db.workload}.data.svc.cluster.local")
        assert conn.labels[TCP_WORKLOAD_AT] == db.workload
        t.tcp_closed(conn, sent=1, received=1)
    assert len(t._label_memo) <= 2
    opened = _samples(_scrape(t), "istio_tcp_connections_opened_total")
    assert sorted((s.labels["destination_workload"], s.value) for s in opened) == \
        [(db.workload, 2) for db in dbs]


# --- cardinality guard -------------------------------------------------------------

def test_label_values_are_bounded() -> None:
    t = Telemetry(access_log=lambda line: None)
    _request(t, path="/item/1")
    _request(t, path="/item/2")
    _request(t, destination_service="evil host\n{}\"", response_flags="XYZ,UH,UH")
    _request(t, destination=Peer(workload="w" * 1000, namespace="ns"))
    fams = _scrape(t)
    samples = _samples(fams, "istio_requests_total")
    assert "/item/" not in fams["text"]  # the path is never a label, as in Istio
    assert sum(s.value for s in samples) == 4
    assert len(samples) == 3  # the two paths share one series
    assert any(s.labels["destination_service"] == "unknown" and s.labels["response_flags"] == "UH"
               for s in samples)
    assert max(len(v) for s in samples for v in s.labels.values()) == MAX_LABEL_LEN


def test_join_flags_orders_known_flags_and_drops_the_rest() -> None:
    assert join_flags("-") == "-"
    assert join_flags(None, "") == "-"
    assert join_flags("RL", "UO,UH") == "UH,UO,RL"
    assert join_flags("bogus, UT ,UT") == "UT"


# --- request headers ----------------------------------------------------------------

def test_request_id_added_only_when_absent() -> None:
    headers = [(b":method", b"GET"), (b"host", b"reviews")]
    out, rid = ensure_request_id(headers)
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", rid)
    assert out == [*headers, (b"x-request-id", rid.encode())]
    assert headers == [(b":method", b"GET"), (b"host", b"reviews")]  # input untouched

    kept, rid2 = ensure_request_id([(b"X-Request-Id", b"abc-123"), (b"x-request-id", b"dup")])
    assert (kept, rid2) == ([(b"X-Request-Id", b"abc-123")], "abc-123")

    replaced, rid3 = ensure_request_id([(b"x-request-id", b"  ")])  # empty counts as absent
    assert replaced == [(b"x-request-id", rid3.encode())] and rid3.strip()
    assert ensure_request_id([])[1] != ensure_request_id([])[1]


VALID_TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_valid_traceparent_is_passed_through_unchanged() -> None:
    headers = [(b"host", b"reviews"), (b"traceparent", VALID_TP.encode()), (b"tracestate", b"a=1")]
    out, tp = propagate_traceparent(headers)
    assert (out, tp) == (headers, VALID_TP)
    assert propagate_traceparent([(b"host", b"x")]) == ([(b"host", b"x")], None)


def test_traceparent_reparented_keeps_trace_id_and_flags() -> None:
    headers = [(b"traceparent", VALID_TP.encode()), (b"tracestate", b"a=1")]
    out, tp = propagate_traceparent(headers, reparent=True)
    assert tp is not None
    version, trace_id, parent_id, flags = tp.split("-")
    assert (version, trace_id, flags) == ("00", "4bf92f3577b34da6a3ce929d0e0e4736", "01")
    assert re.fullmatch(r"[0-9a-f]{16}", parent_id) and parent_id not in ("00f067aa0ba902b7", "0" * 16)
    assert out == [(b"traceparent", tp.encode()), (b"tracestate", b"a=1")]


@pytest.mark.parametrize("bad", [
    "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # upper-case hex
    "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # a version we do not know
    "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # the forbidden version
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # zero trace-id
    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # zero parent-id
    "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",  # short trace-id
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",  # short flags
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
    "garbage",
])
def test_invalid_traceparent_is_dropped_with_tracestate(bad: str) -> None:
    headers = [(b"host", b"reviews"), (b"traceparent", bad.encode()), (b"tracestate", b"a=1")]
    assert propagate_traceparent(headers) == ([(b"host", b"reviews")], None)


def test_several_traceparent_headers_are_dropped() -> None:
    headers = [(b"traceparent", VALID_TP.encode()), (b"traceparent", VALID_TP.encode())]
    assert propagate_traceparent(headers) == ([], None)


# --- the endpoint -------------------------------------------------------------------

def test_readiness_endpoint() -> None:
    state = {"ready": False}

    async def go() -> None:
        runner = await Telemetry().serve_metrics("127.0.0.1", 0, ready=lambda: state["ready"])
        try:
            port = runner.addresses[0][1]
            assert (await _get(port, "/healthz/ready"))[0] == 503
            state["ready"] = True
            assert (await _get(port, "/healthz/ready"))[0] == 200
        finally:
            await runner.cleanup()

    _run(go)


def test_port_in_use_is_one_user_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        async def go() -> None:
            with pytest.raises(UserError, match=rf"127\.0\.0\.1:{port}.*already in use"):
                await Telemetry().serve_metrics("127.0.0.1", port)

        _run(go)


def test_two_telemetries_on_one_registry_are_refused() -> None:
    t = Telemetry()
    with pytest.raises(ValueError):
        Telemetry(registry=t.registry)
