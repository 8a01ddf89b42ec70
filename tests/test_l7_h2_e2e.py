"""HTTP/2 (h2c) and gRPC through the node proxy with real clients and servers in the
sandbox (root): a grpcio client in an enrolled pod calling services whose port is named
``grpc`` (sandbox/grpc_apps.py servers), and h2load / curl against nghttpd (Debian's
nghttp2-server, h2c with prior knowledge) behind a port named ``http2`` and behind a port
that declares nothing (the proxy sniffs the connection preface).

Proves: one gRPC channel is balanced per call; h2load's multiplexed requests are balanced
per stream; grpc-status and trailing metadata reach the client unchanged; large messages,
streams and h2c bodies pass byte-exact; a client cancel resets the upstream stream; and
GRPCRoute timeouts and retries from the YAML folder apply per call.
"""

from __future__ import annotations

import collections
import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox.grpc_apps import pattern
from sandbox.node import Pod, Sandbox
from sandbox.scenario import Scenario

pytestmark = pytest.mark.root
PY = sys.executable
GREETER_VIP, GREETER_ONE_VIP = "198.19.2.10", "198.19.2.11"
H2WEB_VIP, H2PLAIN_VIP = "198.19.2.20", "198.19.2.21"
GRPC_PORT = 50051
GREETER = f"{GREETER_VIP}:{GRPC_PORT}"
GREETER_ONE = f"{GREETER_ONE_VIP}:{GRPC_PORT}"
BIG = 16 << 20  # the h2c download: many times every window on the way


class H2:
    """The standard scenario plus three gRPC server pods and three nghttpd pods."""

    def __init__(self, sc: Scenario) -> None:
        self.sc = sc
        sb, m = sc.sb, sc.manifests
        # grpcio (gRPC core) connects IPv4 addresses over a dual-stack IPv6 socket, as
        # ::ffff:a.b.c.d, whenever the netns has IPv6 (it has here): these calls go
        # through cgroup/connect6's v4-mapped redirect (bpf/connect6.c).
        self.greeters: list[Pod] = [sb.add_pod(f"greeter-{i}", "shop", {"app": "greeter"})
                                    for i in range(3)]
        for p in self.greeters:
            m.pod(p)
            proc = p.spawn([PY, "-m", "sandbox.grpc_apps", "server", "--port", str(GRPC_PORT),
                            "--name", p.name], stdout=subprocess.PIPE, text=True)
            assert proc.stdout is not None and json.loads(proc.stdout.readline())["listening"] == GRPC_PORT
            sc.servers[p.key] = proc
        m.service("shop", "greeter", GREETER_VIP, [("grpc", GRPC_PORT, GRPC_PORT)])
        m.endpoint_slice("shop", "greeter", self.greeters, [("grpc", GRPC_PORT)])
        m.service("shop", "greeter-one", GREETER_ONE_VIP, [("grpc", GRPC_PORT, GRPC_PORT)])
        m.endpoint_slice("shop", "greeter-one", self.greeters[:1], [("grpc", GRPC_PORT)])

        self.webs: list[Pod] = [sb.add_pod(f"h2web-{i}", "shop", {"app": "h2web"}) for i in range(3)]
        self.big = pattern(BIG, seed=1)
        self.logs: dict[str, Path] = {}
        for p in self.webs:
            m.pod(p)
            docroot = sb.workdir / f"htdocs-{p.name}"
            docroot.mkdir()
            (docroot / "index.html").write_text(f"{p.name}\n")
            (docroot / "big").write_bytes(self.big)
            self.logs[p.name] = sb.workdir / f"nghttpd-{p.name}.log"
            with open(self.logs[p.name], "w") as log:
                # -v logs every frame: the test counts the requests each server received.
                sc.servers[p.key] = p.spawn(["nghttpd", "--no-tls", "--echo-upload", "-v", "-d",
                                             str(docroot), "8080"], stdout=log, stderr=subprocess.STDOUT)
            _wait(lambda p=p: p.run(["curl", "-s", "--http2-prior-knowledge", "-o", "/dev/null",
                                     "http://127.0.0.1:8080/index.html"]).returncode == 0,
                  f"nghttpd in {p.key}")
        m.service("shop", "h2web", H2WEB_VIP, [("http2", 80, 8080)])
        m.endpoint_slice("shop", "h2web", self.webs, [("http2", 8080)])
        m.service("shop", "h2plain", H2PLAIN_VIP, [("", 8000, 8080)])  # declares nothing: sniffed
        m.endpoint_slice("shop", "h2plain", self.webs, [("", 8080)])

    def grpc(self, *args: str, timeout: float = 120) -> dict[str, Any]:
        """``python -m sandbox.grpc_apps`` in the meshed client pod; its JSON report."""
        res = self.sc.shop_client.run([PY, "-m", "sandbox.grpc_apps", *args], timeout=timeout)
        if res.returncode != 0:
            raise AssertionError(f"grpc_apps {args} failed ({res.returncode}): {res.stderr[-3000:]}")
        return json.loads(res.stdout.strip().splitlines()[-1])

    def requests_seen(self) -> dict[str, int]:
        """Requests each nghttpd received so far (one HEADERS frame each)."""
        return {name: log.read_text(errors="replace").count("recv HEADERS frame")
                for name, log in self.logs.items()}

    def http2_stats(self) -> dict[str, int]:
        return dict(self.sc.cli_json("status")["http2"])


def _wait(predicate: Any, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="module")
def h2() -> Iterator[H2]:
    with Sandbox() as sb:
        sc = Scenario(sb).build()
        env = H2(sc)
        sc.start_agent()
        try:
            yield env
        finally:
            sc.stop_agent()


# -- gRPC ---------------------------------------------------------------------------------

def test_one_grpc_channel_is_balanced_per_call(h2: H2) -> None:
    before = h2.http2_stats()
    res = h2.grpc("unary", "--target", GREETER, "--method", "Hello", "--calls", "300")
    assert res["ok"] == 300, res["codes"]
    assert set(res["servers"]) == {"greeter-0", "greeter-1", "greeter-2"}
    assert min(res["servers"].values()) >= 80, res["servers"]
    # Every server saw the client pod's own address: connections are made from its netns.
    peers = {r["reply"]["peer"].rsplit(":", 1)[0] for r in res["results"]}
    assert peers == {f"ipv4:{h2.sc.shop_client.ip}"}
    after = h2.http2_stats()
    # One client connection, one multiplexed upstream connection per endpoint: pooled, not per call.
    assert after["connections"] - before["connections"] == 1
    assert after["streams"] - before["streams"] == 300
    assert after["upstream_connects"] - before["upstream_connects"] <= 3
    assert after["local_replies"] == before["local_replies"]


def test_grpc_status_and_trailers_reach_the_client_unchanged(h2: H2) -> None:
    ask = json.dumps({"code": "NOT_FOUND", "message": "no such order 42"})
    res = h2.grpc("unary", "--target", GREETER, "--method", "Fail", "--request", ask, "--calls", "6")
    assert res["codes"] == {"NOT_FOUND": 6}
    for r in res["results"]:
        assert r["details"] == "no such order 42"
        assert r["trailers"]["x-failed-by"].startswith("greeter-")
        assert r["trailers"]["x-bin-bin"] == "0001feff"  # binary metadata, byte-exact
    ask = json.dumps({"code": "PERMISSION_DENIED", "message": "nope"})
    res = h2.grpc("unary", "--target", GREETER, "--method", "Fail", "--request", ask)
    assert res["codes"] == {"PERMISSION_DENIED": 1} and res["results"][0]["details"] == "nope"


def test_grpc_large_message_and_streaming_call_pass_byte_exact(h2: H2) -> None:
    res = h2.grpc("echo", "--target", GREETER, "--size", str(8 << 20))
    assert res["exact"] and res["received"] == 8 << 20, res
    assert res["trailers"]["x-served-by"].startswith("greeter-")
    res = h2.grpc("stream", "--target", GREETER, "--messages", "60", "--size", "150000")
    assert res == {"messages": 60, "bytes": 60 * 150000, "exact": True}


def test_client_cancel_resets_the_upstream_stream(h2: H2) -> None:
    def cancelled() -> int:
        stats = h2.grpc("unary", "--target", GREETER_ONE, "--method", "Stats")
        return int(stats["results"][0]["reply"]["cancelled"])

    before = cancelled()
    t0 = time.monotonic()
    res = h2.grpc("cancel", "--target", GREETER_ONE, "--after", "1")
    assert res == {"cancelled": True, "code": "CANCELLED"}
    # The server's 30 s call ends as soon as the RST_STREAM the proxy passed on arrives.
    _wait(lambda: cancelled() == before + 1, "the server to see the cancel")
    assert time.monotonic() - t0 < 15


def test_grpcroute_timeout_and_retry_on_a_grpc_status(h2: H2) -> None:
    # On the one-endpoint service: Flaky fails every third call a server gets, and a retry then
    # goes to the same endpoint (with three endpoints, round robin can line their failures up).
    backend = [{"name": "greeter-one", "port": GRPC_PORT}]
    flaky = json.dumps({"every": 3})
    res = h2.grpc("unary", "--target", GREETER_ONE, "--method", "Flaky", "--request", flaky, "--calls", "30")
    assert res["codes"] == {"OK": 20, "UNAVAILABLE": 10}  # without a retry policy the client sees them
    hello = "nodemesh.sandbox.Hello"
    h2.sc.manifests.write("grpcroute-greeter-one.yaml", {
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "GRPCRoute",
        "metadata": {"name": "greeter-one", "namespace": "shop"},
        "spec": {"parentRefs": [{"kind": "Service", "name": "greeter-one", "port": GRPC_PORT}], "rules": [
            {"matches": [{"method": {"service": hello, "method": "Slow"}}],
             "timeouts": {"request": "500ms"}, "backendRefs": backend},
            {"matches": [{"method": {"service": hello, "method": "Flaky"}}],
             "retry": {"attempts": 2, "grpcCodes": ["unavailable"]}, "backendRefs": backend},
            {"backendRefs": backend}]}})
    applied = f"{hello}/Slow"
    try:
        h2.sc.wait_for(lambda: applied in h2.sc.cli("config", "-o", "json").stdout, timeout=15,
                       what="the GRPCRoute applied")
        t0 = time.monotonic()
        res = h2.grpc("unary", "--target", GREETER_ONE, "--method", "Slow", "--request", '{"ms": 5000}')
        r = res["results"][0]
        assert r["code"] == "DEADLINE_EXCEEDED", r
        assert (r["initial"] | r["trailers"])["x-nodemesh-response-flags"] == "UT"
        assert time.monotonic() - t0 < 4.5
        res = h2.grpc("unary", "--target", GREETER_ONE, "--method", "Flaky", "--request", flaky,
                      "--calls", "60")
        assert res["codes"] == {"OK": 60}  # the retries hide every UNAVAILABLE
    finally:
        h2.sc.manifests.remove("grpcroute-greeter-one.yaml")
        h2.sc.wait_for(lambda: applied not in h2.sc.cli("config", "-o", "json").stdout, timeout=15,
                       what="the GRPCRoute removed")


def test_grpc_requests_are_counted_in_istio_metrics(h2: H2) -> None:
    assert h2.sc.sb.node is not None

    def count(status: str) -> float:
        text = h2.sc.sb.node.run(["curl", "-s", "http://127.0.0.1:15020/metrics"]).stdout  # type: ignore[union-attr]
        total = 0.0
        for line in text.splitlines():
            if line.startswith("istio_requests_total{") and 'request_protocol="grpc"' in line \
                    and 'destination_service="greeter.shop.svc.cluster.local"' in line \
                    and f'grpc_response_status="{status}"' in line:
                total += float(line.rsplit(" ", 1)[1])
        return total

    ok, not_found = count("0"), count("5")
    h2.grpc("unary", "--target", GREETER, "--method", "Hello", "--calls", "25")
    h2.grpc("unary", "--target", GREETER, "--method", "Fail", "--request", '{"code": "NOT_FOUND"}',
            "--calls", "4")
    _wait(lambda: count("0") - ok == 25 and count("5") - not_found == 4, "the metrics")


# -- plain h2c ----------------------------------------------------------------------------

def _h2load(h2: H2, url: str, n: int) -> str:
    res = h2.sc.shop_client.run(["h2load", "-n", str(n), "-c", "1", "-m", "10", url], timeout=120)
    assert f"{n} succeeded, 0 failed, 0 errored" in res.stdout, res.stdout + res.stderr
    assert f"{n} 2xx" in res.stdout, res.stdout
    return res.stdout


@pytest.mark.parametrize("vip", [H2WEB_VIP + ":80", H2PLAIN_VIP + ":8000"], ids=["declared", "sniffed"])
def test_h2load_is_balanced_per_stream(h2: H2, vip: str) -> None:
    before = h2.requests_seen()
    stats = h2.http2_stats()
    _h2load(h2, f"http://{vip}/index.html", 300)
    time.sleep(0.3)  # the servers' logs
    seen = h2.requests_seen()
    spread = collections.Counter({name: seen[name] - before[name] for name in seen})
    assert sum(spread.values()) == 300, spread
    assert min(spread.values()) >= 80, spread
    assert h2.http2_stats()["connections"] - stats["connections"] == 1  # h2load's one connection


def test_h2c_bodies_stream_byte_exact_both_ways(h2: H2) -> None:
    client = h2.sc.shop_client
    res = client.run(["sh", "-c", f"curl -sS --http2-prior-knowledge --max-time 60 http://{H2WEB_VIP}/big "
                      "| sha256sum"], timeout=90)
    assert res.stdout.split()[0] == hashlib.sha256(h2.big).hexdigest(), res.stderr
    upload = h2.sc.sb.workdir / "upload.bin"
    upload.write_bytes(pattern(12 << 20, seed=2))
    res = client.run(["sh", "-c", f"curl -sS --http2-prior-knowledge --max-time 60 --data-binary @{upload} "
                      f"http://{H2WEB_VIP}/echo | sha256sum"], timeout=90)
    assert res.stdout.split()[0] == hashlib.sha256(upload.read_bytes()).hexdigest(), res.stderr
