"""The splice(2) L4 engine (`--l4-engine splice`) against the foundation's
end-to-end tests (root): byte-exact concurrent flows with half-close, a
server-first protocol, balancing, `nodemesh connections`, and no descriptor
left behind in the agent once the flows end."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from sandbox.node import Sandbox
from sandbox.scenario import ECHO_PORT, ECHO_VIP, WEB_PORT, WEB_VIP, Scenario
from tests.test_mesh_e2e import test_byte_exact_concurrent_flows_with_half_close as _byte_exact
from tests.test_mesh_e2e import test_enrolled_pod_connections_are_redirected_and_balanced as _balanced

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def spliced() -> Iterator[Scenario]:
    with Sandbox() as sb:
        sc = Scenario(sb, agent_args=("--l4-engine", "splice")).build()
        sc.start_agent()
        try:
            yield sc
        finally:
            sc.stop_agent()


def _stats(sc: Scenario) -> dict[str, int]:
    status = sc.cli_json("status")
    assert status["l4_engine"] == "splice"
    return status["splice"]


def _agent_fds(sc: Scenario) -> int:
    assert sc.agent is not None
    return len(os.listdir(f"/proc/{sc.agent.pid}/fd"))


def test_byte_exact_concurrent_flows_with_half_close(spliced: Scenario) -> None:
    """64 flows x 8 MiB through the echo service, every byte back in order and the
    trailer the echo sends after the client's EOF; all of them spliced, and the
    agent holds no more descriptors afterwards (sockets and pipes closed)."""
    spliced.wait_for(lambda: not spliced.cli_json("connections"), what="no flows")
    fds = _agent_fds(spliced)
    before = _stats(spliced)
    _byte_exact(spliced)
    after = _stats(spliced)
    assert after["spliced"] - before["spliced"] == 64, (before, after)
    assert after["fallback"] == before["fallback"] and after["reset"] == before["reset"]
    spliced.wait_for(lambda: not spliced.cli_json("connections"), what="flows to close")
    spliced.wait_for(lambda: _agent_fds(spliced) <= fds, what=f"agent back to {fds} fds")


def test_small_exchanges_with_half_close(spliced: Scenario) -> None:
    res = spliced.app(spliced.shop_client, "flood", "--target", f"{ECHO_VIP}:{ECHO_PORT}",
                      "--flows", "32", "--size", "100")
    assert all(f.get("match") and f["trailer_ok"] for f in res["flows"]), res["flows"][:3]


def test_connections_are_balanced_and_shown_spliced(spliced: Scenario) -> None:
    """A server-first protocol (the greeting is read before the engine takes
    over), balanced over the endpoints, and shown as spliced while open, with
    the bytes each way counted."""
    before = _stats(spliced)["spliced"]
    proc, _ = spliced.hold(spliced.shop_client, f"{WEB_VIP}:{WEB_PORT}", 2)
    try:
        rows = spliced.cli_json("connections")
        assert {f["state"] for f in rows} == {"spliced"}, rows
        assert all(f["bytes_received"] > 0 for f in rows), rows  # the greetings
        assert "spliced" in spliced.cli("connections").stdout
    finally:
        spliced.release(proc)
    spliced.wait_for(lambda: not spliced.cli_json("connections"), what="flows to close")
    _balanced(spliced)
    assert _stats(spliced)["spliced"] - before == 32


def test_a_port_declaring_no_protocol_is_sniffed_then_spliced(spliced: Scenario) -> None:
    """An unnamed port: the proxy sniffs the client's first bytes (not HTTP), and
    the engine takes the flow with those bytes first, in order."""
    vip = "198.19.0.31"
    spliced.manifests.service("shop", "echo-plain", vip, [("", 7, 7007)])
    spliced.manifests.endpoint_slice("shop", "echo-plain", [spliced.echo], [("", 7007)])
    spliced.wait_for(lambda: any(s["vip"] == f"{vip}:7" and s["backends"]
                                 for s in spliced.cli_json("status")["services"]),
                     what="the unnamed service to be served")
    before = _stats(spliced)["spliced"]
    res = spliced.app(spliced.shop_client, "flood", "--target", f"{vip}:7",
                      "--flows", "8", "--size", str(1 << 20))
    assert all(f.get("match") and f["trailer_ok"] for f in res["flows"]), res["flows"][:3]
    assert _stats(spliced)["spliced"] - before == 8
