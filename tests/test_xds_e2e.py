"""Services and endpoints over xDS, end to end on the real kernel (root):
NACKs that keep the last good config, an external control plane restarted
under live traffic, an agent started while its control plane is down, and
control planes that are unreachable or speak garbage."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from sandbox.node import Sandbox
from sandbox.scenario import CP_LISTEN, WEB_PORT, WEB_PORT_NAME, WEB_TARGET, WEB_VIP, Scenario

pytestmark = pytest.mark.root
WEB = f"{WEB_VIP}:{WEB_PORT}"


def _xds(sc: Scenario) -> dict:  # type: ignore[type-arg]
    return sc.cli_json("status")["xds"]


def _last(sc: Scenario, kind: str) -> dict:  # type: ignore[type-arg]
    return sc.cli_json("config")["types"][kind]["last"] or {}


def _services(sc: Scenario) -> dict[str, list[str]]:
    return {s["vip"]: s["backends"] for s in sc.cli_json("status")["services"]}


@pytest.fixture
def external() -> Iterator[Scenario]:
    """A sandbox whose agent takes its config from a separate control plane process."""
    with Sandbox() as sb:
        sc = Scenario(sb, agent_args=("--xds-address", CP_LISTEN)).build()
        sc.start_control_plane()
        try:
            yield sc
        finally:
            sc.stop_agent()
            sc.stop_control_plane()


def test_unusable_resource_is_nacked_and_the_last_good_config_keeps_serving(
        fresh_scenario: Scenario) -> None:
    sc = fresh_scenario
    sc.start_agent()
    accepted = _xds(sc)["accepted"]
    sc.manifests.service("shop", "v6only", "fd00::10", [("tcp-x", 80, 8080)])
    reason = sc.wait_for(lambda: _last(sc, "listeners").get("status") == "NACK"
                         and _last(sc, "listeners")["reason"], what="the NACK")
    assert "fd00::10" in reason and "IPv6" in reason
    assert _xds(sc)["rejected"] >= 1
    assert "fd00::10_80" not in {r["name"] for r in
                                 sc.cli_json("config")["types"]["listeners"]["resources"]}
    assert sc.app(sc.shop_client, "probe", "--target", WEB)["ok"]  # still served
    table = sc.cli("config").stdout
    assert "NACK" in table and "IPv6" in table
    log = sc.log_text()
    assert "rejected listeners" in log and "Traceback" not in log
    # The (embedded) control plane logs the NACK with the client and its count.
    assert f"xDS NACK from node 'nodemesh~node-1~{sc.instance}'" in log and "NACK #1" in log
    # The operator fixes it: the next version is good and ACKed.
    sc.manifests.remove("svc-shop-v6only.yaml")
    sc.wait_for(lambda: _last(sc, "listeners").get("status") == "ACK", what="the ACK")
    assert _xds(sc)["accepted"] > accepted
    assert sc.app(sc.shop_client, "probe", "--target", WEB)["ok"]


def test_changed_service_port_moves_the_redirect(fresh_scenario: Scenario) -> None:
    sc = fresh_scenario
    sc.start_agent()
    sc.manifests.service("shop", "web", WEB_VIP, [(WEB_PORT_NAME, 8081, WEB_TARGET)])
    sc.wait_for(lambda: f"{WEB_VIP}:8081" in _services(sc), what="the new port")
    assert f"{WEB_VIP}:80" not in _services(sc)
    assert sc.app(sc.shop_client, "probe", "--target", f"{WEB_VIP}:8081")["ok"]
    old = sc.app(sc.shop_client, "probe", "--target", WEB)
    assert not old["ok"] and old["errno"] in (101, 113)  # no longer in the BPF service map


def test_state_of_the_world_mode_works_end_to_end() -> None:
    with Sandbox() as sb:
        sc = Scenario(sb, agent_args=("--xds-mode", "sotw")).build()
        sc.start_agent()
        try:
            assert _xds(sc)["mode"] == "sotw"
            proc, held = sc.hold(sc.shop_client, WEB, 6)
            sc.release(proc)
            assert {r["server"] for r in held["results"]} == {"web-0", "web-1", "web-2"}
            sc.write_web_endpoints(sc.webs[:1])
            sc.wait_for(lambda: len(_services(sc)[WEB]) == 1, what="one endpoint (sotw)")
        finally:
            sc.stop_agent()


def test_control_plane_restart_keeps_flows_and_the_agent_resyncs(external: Scenario) -> None:
    sc = external
    sc.start_agent()
    assert _xds(sc)["connected"]
    proc, held = sc.hold(sc.shop_client, WEB, 3)
    try:
        assert all(r["ok"] for r in held["results"])
        assert sc.stop_control_plane() == 0
        sc.wait_for(lambda: not _xds(sc)["connected"], what="the agent to notice")
        # Established flows are untouched; new connections work on the last config.
        assert len(sc.cli_json("connections")) == 3
        assert sc.app(sc.shop_client, "probe", "--target", WEB)["ok"]
        sc.write_web_endpoints(sc.webs[:1])  # a change made while it is down
        sc.start_control_plane()
        sc.wait_for(lambda: _services(sc).get(WEB) == [f"{sc.webs[0].ip}:{WEB_TARGET}"],
                    timeout=20, what="the agent to resync")
        assert _xds(sc)["connected"]
        assert len(sc.cli_json("connections")) == 3
    finally:
        sc.release(proc)


def test_agent_started_while_control_plane_is_down_serves_persisted_config(
        external: Scenario) -> None:
    sc = external
    sc.start_agent()
    assert sc.stop_agent() == 0
    assert sc.stop_control_plane() == 0
    sc.start_agent()
    x = _xds(sc)
    assert x["source"] == "persisted" and not x["connected"]
    proc, held = sc.hold(sc.shop_client, WEB, 6)
    sc.release(proc)
    assert {r["server"] for r in held["results"]} == {"web-0", "web-1", "web-2"}
    sc.start_control_plane()
    sc.wait_for(lambda: _xds(sc)["source"] == "control-plane", timeout=20, what="resync")


def test_unreachable_control_plane_without_persisted_config(fresh_scenario: Scenario) -> None:
    sc = fresh_scenario
    sc.agent_args = ("--xds-address", "127.0.0.1:1")
    sc.start_agent(wait_ready=False)
    x = sc.wait_for(lambda: (_xds(sc)["last_error"] and _xds(sc)), what="the error")
    assert x["source"] == "none" and not x["connected"]
    assert "UNAVAILABLE" in x["last_error"]
    assert sc.cli_json("status")["ready"] is False
    lines = [ln for ln in sc.log_text().splitlines() if "127.0.0.1:1" in ln]
    assert lines and all("Traceback" not in ln for ln in lines)
    assert "Traceback" not in sc.log_text()


def test_control_plane_speaking_garbage(fresh_scenario: Scenario) -> None:
    """A TCP server that answers with bytes that are not HTTP/2 (say, an HTTP/1
    server on the wrong port): a clear error, the last good state kept."""
    sc = fresh_scenario
    sc.start_agent()  # embedded control plane: services known, and persisted
    assert sc.stop_agent() == 0
    assert sc.sb.node is not None
    garbage = sc.sb.node.spawn([
        "python3", "-c",
        "import socket\n"
        "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        "s.bind(('127.0.0.1', 15099)); s.listen(16)\n"
        "for _ in range(200):\n"
        "    c, _ = s.accept(); c.sendall(b'HTTP/1.1 400 Bad Request\\r\\n\\r\\n' * 50); c.close()\n"])
    time.sleep(0.3)
    sc.agent_args = ("--xds-address", "127.0.0.1:15099")
    sc.start_agent()  # ready from the persisted config
    x = sc.wait_for(lambda: (_xds(sc)["last_error"] and _xds(sc)), what="the error")
    assert x["source"] == "persisted" and not x["connected"]
    assert sc.app(sc.shop_client, "probe", "--target", WEB)["ok"]
    assert "Traceback" not in sc.log_text()
    garbage.kill()


def test_config_command_shows_versions_acks_and_resources(fresh_scenario: Scenario) -> None:
    sc = fresh_scenario
    sc.start_agent()
    dump = sc.cli_json("config")
    assert dump["synced"] and dump["source"] == "control-plane"
    for kind in ("clusters", "endpoints", "listeners"):
        t = dump["types"][kind]
        assert t["version"] and t["last"]["status"] == "ACK" and t["count"] >= 2, (kind, t)
    names = {r["name"] for r in dump["types"]["listeners"]["resources"]}
    assert f"{WEB_VIP}_{WEB_PORT}" in names
    assert "outbound|80||web.shop.svc.cluster.local" in {
        r["name"] for r in dump["types"]["clusters"]["resources"]}
    text = sc.cli("config").stdout
    assert "TYPE" in text and "ACK" in text and f"{WEB_VIP}_{WEB_PORT}" in text


