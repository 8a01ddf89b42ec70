"""L7 through the node proxy with real clients and servers in the sandbox
(root): per-request balancing on keep-alive connections, routes, retries,
timeouts, circuit breaking, outlier ejection, rate limits, sniffing."""

from __future__ import annotations

import collections
import subprocess
import sys
from collections.abc import Iterator

import pytest

from sandbox.node import Pod, Sandbox
from sandbox.scenario import Scenario

pytestmark = pytest.mark.root
API_VIP = "198.19.1.10"
PLAIN_VIP = "198.19.1.11"
API = f"http://{API_VIP}"


class L7:
    def __init__(self, sc: Scenario) -> None:
        self.sc = sc
        m = sc.manifests
        self.apis: list[Pod] = [sc.sb.add_pod(f"api-{i}", "shop", {"app": "api"}) for i in range(3)]
        for p in self.apis:
            m.pod(p)
            sc.servers[p.key] = p.spawn([sys.executable, "-m", "sandbox.http_apps", "--port", "8080",
                                         "--name", p.name], stdout=subprocess.PIPE, text=True)
            assert sc.servers[p.key].stdout.readline()  # type: ignore[union-attr]
        m.service("shop", "api", API_VIP, [("http", 80, 8080)])
        m.endpoint_slice("shop", "api", self.apis, [("http", 8080)])
        m.service("shop", "api-v1", "198.19.1.12", [("http", 80, 8080)])
        m.endpoint_slice("shop", "api-v1", self.apis[:1], [("http", 8080)])
        m.service("shop", "api-v2", "198.19.1.13", [("http", 80, 8080)])
        m.endpoint_slice("shop", "api-v2", self.apis[1:], [("http", 8080)])
        m.service("shop", "plain", PLAIN_VIP, [("", 8000, 8080)])  # declares nothing
        m.endpoint_slice("shop", "plain", self.apis, [("", 8080)])

    def curl(self, *urls: str, extra: tuple[str, ...] = ()) -> list[tuple[int, str]]:
        """One curl process, one keep-alive connection for all the URLs."""
        res = self.sc.shop_client.run(
            ["curl", "-s", "--max-time", "30", "-w",
             "%{http_code} %header{x-server} %{num_connects}\\n", *extra,
             *[a for u in urls for a in ("-o", "/dev/null", u)]], timeout=120)
        out = []
        self.connects = 0
        for line in res.stdout.splitlines():
            code, server, connects = (line.split(" ") + ["", ""])[:3]
            out.append((int(code), server))
            self.connects += int(connects or 0)
        return out


@pytest.fixture(scope="module")
def l7() -> Iterator[L7]:
    with Sandbox() as sb:
        sc = Scenario(sb).build()
        env = L7(sc)
        sc.start_agent()
        try:
            yield env
        finally:
            sc.stop_agent()


def test_keepalive_connection_is_balanced_per_request(l7: L7) -> None:
    results = l7.curl(*[f"{API}/n/{i}" for i in range(300)])
    assert len(results) == 300 and all(code == 200 for code, _ in results), results[:5]
    assert l7.connects == 1  # curl reused one connection for all 300
    spread = collections.Counter(server for _, server in results)
    assert set(spread) == {"api-0", "api-1", "api-2"}
    assert min(spread.values()) >= 80, spread


# -- helpers for the tests below ----------------------------------------------------------

def _route_yaml(name: str, rules: str) -> str:
    return f"""apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}, namespace: shop}}
spec:
  parentRefs: [{{kind: Service, name: api, port: 80}}]
  rules:
{rules}"""


def _policy_yaml(spec: str) -> str:
    return f"""apiVersion: nodemesh.io/v1alpha1
kind: TrafficPolicy
metadata: {{name: api, namespace: shop}}
spec:
  targetRef: {{kind: Service, name: api}}
{spec}"""


def _apply(l7: L7, filename: str, text: str, check: str) -> None:
    """Write a manifest and wait until the agent serves it (checked by its route names
    or cluster fields in `nodemesh config`)."""
    (l7.sc.dir / filename).write_text(text)
    l7.sc.wait_for(lambda: check in l7.sc.cli("config", "-o", "json").stdout, timeout=15,
                   what=f"{filename} applied")


def _remove(l7: L7, filename: str, gone: str) -> None:
    (l7.sc.dir / filename).unlink()
    l7.sc.wait_for(lambda: gone not in l7.sc.cli("config", "-o", "json").stdout, timeout=15,
                   what=f"{filename} removed")


def _metric(l7: L7, name: str, **labels: str) -> float:
    assert l7.sc.sb.node is not None
    text = l7.sc.sb.node.run(["curl", "-s", "http://127.0.0.1:15020/metrics"]).stdout
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _curl_one(l7: L7, url: str, *extra: str) -> tuple[int, dict[str, str], str]:
    res = l7.sc.shop_client.run(["curl", "-s", "-i", "--max-time", "20", *extra, url], timeout=60)
    head, _, body = res.stdout.replace("\r\n", "\n").partition("\n\n")
    lines = head.splitlines()
    code = int(lines[0].split(" ")[1]) if lines else 0
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return code, headers, body


# -- acceptance -------------------------------------------------------------------------

def test_request_metrics_count_what_was_sent(l7: L7) -> None:
    labels = {"destination_service": "api.shop.svc.cluster.local", "response_code": "200",
              "reporter": "source", "source_workload": "client", "request_protocol": "http"}
    before = _metric(l7, "istio_requests_total", **labels)
    results = l7.curl(*[f"{API}/m/{i}" for i in range(40)])
    assert all(code == 200 for code, _ in results)
    l7.sc.wait_for(lambda: _metric(l7, "istio_requests_total", **labels) - before == 40,
                   what="40 more requests counted")
    not_found = {"destination_service": "api.shop.svc.cluster.local", "response_code": "404"}
    before404 = _metric(l7, "istio_requests_total", **not_found)
    assert l7.curl(f"{API}/status/404")[0][0] == 404
    l7.sc.wait_for(lambda: _metric(l7, "istio_requests_total", **not_found) - before404 == 1,
                   what="the 404 counted")
    assert _metric(l7, "istio_request_duration_milliseconds_count", **labels) >= 40


def test_request_id_added_and_traceparent_propagated(l7: L7) -> None:
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    code, _, body = _curl_one(l7, f"{API}/seen", "-H", f"traceparent: {tp}")
    import json
    seen = json.loads(body)
    assert code == 200 and seen["traceparent"] == tp
    assert len(seen["x-request-id"] or "") == 36  # a UUID the proxy added
    code, _, body = _curl_one(l7, f"{API}/seen", "-H", "x-request-id: keep-me")
    assert json.loads(body)["x-request-id"] == "keep-me"


def test_httproute_weighted_split_lands_within_five_points(l7: L7) -> None:
    rules = """  - backendRefs: [{name: api-v1, port: 80, weight: 90}, {name: api-v2, port: 80, weight: 10}]
"""
    _apply(l7, "route-split.yaml", _route_yaml("split", rules), "HTTPRoute/shop/split/rule-0")
    try:
        results = l7.curl(*[f"{API}/split/{i}" for i in range(1000)])
        assert all(code == 200 for code, _ in results)
        v1 = sum(1 for _, s in results if s == "api-0")  # api-v1 is api-0 alone
        assert 850 <= v1 <= 950, v1
    finally:
        _remove(l7, "route-split.yaml", "HTTPRoute/shop/split/rule-0")


def _restart_api(l7: L7, pod: Pod, *flags: str) -> None:
    l7.sc.stop_server(pod)
    l7.sc.servers[pod.key] = pod.spawn(
        [sys.executable, "-m", "sandbox.http_apps", "--port", "8080", "--name", pod.name, *flags],
        stdout=subprocess.PIPE, text=True)
    assert l7.sc.servers[pod.key].stdout.readline()  # type: ignore[union-attr]


def test_retries_hide_a_flaky_endpoint_and_without_them_it_shows(l7: L7) -> None:
    flaky = l7.apis[0]
    _restart_api(l7, flaky, "--flaky", "3")  # this endpoint fails 1 request in 3 with 503
    try:
        plain = l7.curl(*[f"{API}/r/{i}" for i in range(90)])
        failed = [s for code, s in plain if code == 503]
        assert set(failed) == {"api-0"} and len(failed) >= 8, plain  # no retry policy: seen
        rules = """  - backendRefs: [{name: api, port: 80}]
    retry: {attempts: 2, codes: [503]}
"""
        _apply(l7, "route-retry.yaml", _route_yaml("retry", rules), "retriableStatusCodes")
        try:
            retried = l7.curl(*[f"{API}/r/{i}" for i in range(90)])
            assert [c for c, _ in retried if c != 200] == []
        finally:
            _remove(l7, "route-retry.yaml", "retriableStatusCodes")
    finally:
        _restart_api(l7, flaky)


def test_slow_upstream_gets_504_at_the_route_timeout(l7: L7) -> None:
    rules = """  - matches: [{path: {type: PathPrefix, value: /slow}}]
    backendRefs: [{name: api, port: 80}]
    timeouts: {request: 500ms}
"""
    _apply(l7, "route-timeout.yaml", _route_yaml("timeout", rules), "HTTPRoute/shop/timeout/rule-0")
    try:
        import time
        t0 = time.monotonic()
        code, headers, _ = _curl_one(l7, f"{API}/slow/3000")
        took = time.monotonic() - t0
        assert code == 504 and headers.get("x-nodemesh-response-flags") == "UT"
        assert 0.45 < took < 2.0, took
        assert _curl_one(l7, f"{API}/slow/100")[0] == 200
    finally:
        _remove(l7, "route-timeout.yaml", "HTTPRoute/shop/timeout/rule-0")


def test_circuit_breaker_rejects_the_request_over_the_limit(l7: L7) -> None:
    _apply(l7, "policy-cb.yaml", _policy_yaml("  circuitBreaker: {maxRequests: 2}\n"),
           '"maxRequests": 2')
    try:
        busy = [l7.sc.shop_client.spawn(["curl", "-s", "-o", "/dev/null", f"{API}/slow/2500"])
                for _ in range(2)]
        import time
        time.sleep(0.8)  # both in flight
        code, headers, _ = _curl_one(l7, f"{API}/now")
        assert code == 503 and headers.get("x-nodemesh-response-flags") == "UO", (code, headers)
        for p in busy:
            p.wait(10)
        assert _curl_one(l7, f"{API}/now")[0] == 200  # released
    finally:
        _remove(l7, "policy-cb.yaml", '"maxRequests": 2')


def test_rate_limit_answers_429_beyond_the_rate(l7: L7) -> None:
    _apply(l7, "policy-rl.yaml", _policy_yaml("  rateLimit: {requestsPerSecond: 5}\n"),
           "tokenBucket")
    try:
        results = l7.curl(*[f"{API}/rl/{i}" for i in range(30)])
        codes = collections.Counter(code for code, _ in results)
        assert codes[429] >= 20 and 5 <= codes[200] <= 10, codes
    finally:
        _remove(l7, "policy-rl.yaml", "tokenBucket")


def test_failing_endpoint_is_ejected_and_readmitted(l7: L7) -> None:
    broken = l7.apis[0]
    _restart_api(l7, broken, "--fail")
    spec = ("  outlierDetection: {consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 3s,"
            " maxEjectionPercent: 50}\n")
    _apply(l7, "policy-od.yaml", _policy_yaml(spec), "outlierDetection")
    try:
        first = l7.curl(*[f"{API}/od/{i}" for i in range(30)])
        failures = [s for c, s in first if c == 500]
        assert set(failures) == {"api-0"} and len(failures) <= 4, first  # ejected after 3
        after = l7.curl(*[f"{API}/od/{i}" for i in range(30)])
        assert all(c == 200 for c, _ in after) and {s for _, s in after} == {"api-1", "api-2"}
        import time
        time.sleep(3.5)  # the ejection runs out
        later = l7.curl(*[f"{API}/od/{i}" for i in range(6)])
        assert "api-0" in {s for _, s in later}  # readmitted (and failing again)
    finally:
        _remove(l7, "policy-od.yaml", "outlierDetection")
        _restart_api(l7, broken)


def test_undeclared_port_carrying_http_is_detected(l7: L7) -> None:
    labels = {"destination_service": "plain.shop.svc.cluster.local", "response_code": "200"}
    before = _metric(l7, "istio_requests_total", **labels)
    sniffed = l7.sc.cli_json("status")["proxy"]["sniffed_http"]
    results = l7.curl(*[f"http://{PLAIN_VIP}:8000/p/{i}" for i in range(9)])
    assert all(code == 200 for code, _ in results)
    st = l7.sc.cli_json("status")
    assert st["proxy"]["sniffed_http"] == sniffed + 1, (str(st["proxy"]), [
        r for r in l7.sc.cli_json("config")["types"]["routes"]["resources"] if "plain" in r["name"]])
    assert {s for _, s in results} == {"api-0", "api-1", "api-2"}  # per request, so it is L7
    l7.sc.wait_for(lambda: _metric(l7, "istio_requests_total", **labels) - before == 9,
                   what="sniffed requests counted")


def test_server_first_protocol_waits_no_longer_than_the_sniff_window(l7: L7) -> None:
    """The whoami server speaks first; on a port that declares nothing the proxy
    waits its sniff window (0.25 s) for the client, then relays as TCP."""
    m = l7.sc.manifests
    m.service("shop", "greet", "198.19.1.14", [("", 7000, 8080)])
    m.endpoint_slice("shop", "greet", l7.sc.webs, [("", 8080)])
    l7.sc.wait_for(lambda: "198.19.1.14:7000" in {s["vip"] for s in l7.sc.cli_json("status")[
        "services"]}, what="greet served")
    import time
    t0 = time.monotonic()
    proc, held = l7.sc.hold(l7.sc.shop_client, "198.19.1.14:7000", 1)
    took = time.monotonic() - t0
    l7.sc.release(proc)
    assert held["results"][0]["ok"], held
    assert took < 1.5, took  # python start-up dominates; the window adds only 0.25 s


def test_large_bodies_stream_byte_exact_with_bounded_memory(l7: L7) -> None:
    """100 MB up (the server hashes what it got) and 100 MB down (deterministic
    bytes the client re-creates), while the agent's memory is sampled."""
    import psutil
    assert l7.sc.agent is not None
    agent = psutil.Process(l7.sc.agent.pid)
    size = 100 * 1024 * 1024
    script = (
        "import hashlib, json, os, random, sys, http.client\n"
        f"size = {size}\n"
        "c = http.client.HTTPConnection(sys.argv[1], 80, timeout=120)\n"
        "h = hashlib.sha256()\n"
        "def body():\n"
        "    left = size\n"
        "    while left:\n"
        "        chunk = os.urandom(min(1 << 20, left)); h.update(chunk); left -= len(chunk)\n"
        "        yield chunk\n"
        "c.request('POST', '/sink', body=body(), headers={'content-length': str(size)})\n"
        "r = c.getresponse(); up = json.loads(r.read())\n"
        "print(r.status, up['size'], up['sha256'] == h.hexdigest())\n"
        "c.request('GET', f'/random/{size}/7'); r = c.getresponse()\n"
        "rng = random.Random(7); n = 0; same = True\n"
        "while chunk := r.read(1 << 20):\n"
        "    same = same and chunk == rng.randbytes(len(chunk)); n += len(chunk)\n"
        "print(r.status, n, same)\n")
    peak = [agent.memory_info().rss]
    import threading
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak.append(agent.memory_info().rss)
            done.wait(0.05)

    t = threading.Thread(target=sample)
    base = agent.memory_info().rss
    t.start()
    try:
        res = l7.sc.shop_client.run([sys.executable, "-c", script, API_VIP], timeout=300)
    finally:
        done.set()
        t.join()
    assert res.stdout.split() == ["200", str(size), "True", "200", str(size), "True"], \
        res.stdout + res.stderr
    assert max(peak) - base < 32 * 1024 * 1024, (max(peak) - base) / 1e6


def test_malformed_request_gets_400_and_only_its_connection_closes(l7: L7) -> None:
    script = (
        "import socket, sys\n"
        "good = socket.create_connection((sys.argv[1], 80))\n"
        "bad = socket.create_connection((sys.argv[1], 80))\n"
        "bad.sendall(b'GET / HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: 5\\r\\n"
        "Transfer-Encoding: chunked\\r\\n\\r\\n')\n"
        "print(bad.recv(4096).split(b'\\r\\n')[0].decode()); print(bad.recv(10) == b'')\n"
        "good.sendall(b'GET /ok HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n')\n"
        "print(good.recv(4096).split(b'\\r\\n')[0].decode())\n")
    res = l7.sc.shop_client.run([sys.executable, "-c", script, API_VIP], timeout=60)
    lines = res.stdout.splitlines()
    assert lines[0].startswith("HTTP/1.1 400"), res.stdout + res.stderr
    assert lines[1] == "True"  # the bad connection is closed
    assert lines[2] == "HTTP/1.1 200 OK"  # the other one is untouched


def test_pipelined_requests_are_answered_in_order(l7: L7) -> None:
    script = (
        "import socket, sys\n"
        "s = socket.create_connection((sys.argv[1], 80))\n"
        "s.sendall(b''.join(b'GET /slow/%d HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n' % ms "
        "for ms in (300, 10, 100)))\n"
        "data = b''\n"
        "while data.count(b'HTTP/1.1 200') < 3 or not data.endswith(b'}\\n'):\n"
        "    chunk = s.recv(65536)\n"
        "    if not chunk: break\n"
        "    data += chunk\n"
        "import re; print(re.findall(rb'\"path\": \"([^\"]+)\"', data))\n")
    res = l7.sc.shop_client.run([sys.executable, "-c", script, API_VIP], timeout=60)
    # One connection, three requests in one write: three answers, in request order,
    # whatever order the upstreams finished in.
    assert res.stdout.strip() == "[b'/slow/300', b'/slow/10', b'/slow/100']", res.stdout + res.stderr


def test_websocket_upgrade_becomes_a_tunnel(l7: L7) -> None:
    script = (
        "import socket, sys\n"
        "s = socket.create_connection((sys.argv[1], 80))\n"
        "s.sendall(b'GET /ws HTTP/1.1\\r\\nHost: x\\r\\nConnection: Upgrade\\r\\n"
        "Upgrade: websocket\\r\\nSec-WebSocket-Version: 13\\r\\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\\r\\n\\r\\n')\n"
        "head = b''\n"
        "while b'\\r\\n\\r\\n' not in head: head += s.recv(1)\n"
        "print(head.split(b'\\r\\n')[0].decode())\n"
        "payload = bytes(range(256)) * 512\n"
        "s.sendall(payload); back = b''\n"
        "while len(back) < len(payload): back += s.recv(65536)\n"
        "print(back == payload)\n")
    res = l7.sc.shop_client.run([sys.executable, "-c", script, API_VIP], timeout=60)
    lines = res.stdout.splitlines()
    assert lines and lines[0].startswith("HTTP/1.1 101"), res.stdout + res.stderr
    assert lines[1] == "True"  # raw bytes both ways after the switch


def test_ring_hash_keeps_a_user_on_one_endpoint(l7: L7) -> None:
    spec = "  loadBalancer: {type: RingHash, hashOn: {header: x-user}}\n"
    _apply(l7, "policy-rh.yaml", _policy_yaml(spec), "RING_HASH")
    try:
        chosen = {}
        for user in ("ada", "bob", "cyd", "dan", "eve", "fay"):
            results = l7.curl(*[f"{API}/rh/{i}" for i in range(10)],
                              extra=("-H", f"x-user: {user}"))
            servers = {s for _, s in results}
            assert len(servers) == 1, (user, results)  # sticky per user
            chosen[user] = servers.pop()
        assert len(set(chosen.values())) >= 2, chosen  # and users are spread
    finally:
        _remove(l7, "policy-rh.yaml", "RING_HASH")


def test_max_connections_queues_and_max_pending_overflows(l7: L7) -> None:
    """maxConnections 1, maxPendingRequests 1: with one slow request holding the only
    connection, a second waits for it (and succeeds), a third overflows: 503 UO."""
    _apply(l7, "policy-cbc.yaml",
           _policy_yaml("  circuitBreaker: {maxConnections: 1, maxPendingRequests: 1}\n"),
           '"maxPendingRequests": 1')
    try:
        import time
        first = l7.sc.shop_client.spawn(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                         f"{API}/slow/1500"], stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)
        second = l7.sc.shop_client.spawn(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                          f"{API}/slow/10"], stdout=subprocess.PIPE, text=True)
        time.sleep(0.3)
        code, headers, _ = _curl_one(l7, f"{API}/third")
        assert code == 503 and headers.get("x-nodemesh-response-flags") == "UO", (code, headers)
        out1, _ = first.communicate(timeout=20)
        out2, _ = second.communicate(timeout=20)
        assert (out1, out2) == ("200", "200")  # the pending one got the connection after
    finally:
        _remove(l7, "policy-cbc.yaml", '"maxPendingRequests": 1')
