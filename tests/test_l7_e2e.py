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
