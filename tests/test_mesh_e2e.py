"""End to end on the real kernel: the eBPF redirect, the node proxy and the
agent's view of them, in a sandbox node (root)."""

from __future__ import annotations

import collections
import subprocess

import pytest

from sandbox.scenario import ECHO_PORT, ECHO_VIP, WEB_PORT, WEB_PORT_NAME, WEB_TARGET, WEB_VIP, Scenario

pytestmark = pytest.mark.root
WEB = f"{WEB_VIP}:{WEB_PORT}"


def test_enrolled_pod_connections_are_redirected_and_balanced(mesh: Scenario) -> None:
    before = mesh.counter("connect4", "redirected")
    proc, held = mesh.hold(mesh.shop_client, WEB, 30)
    try:
        results = held["results"]
        assert all(r["ok"] for r in results), results
        per_server = collections.Counter(r["server"] for r in results)
        assert set(per_server) == {"web-0", "web-1", "web-2"}
        assert min(per_server.values()) >= 8, per_server
        # The upstream connection is made from the client pod's netns.
        assert {r["peer"].split(":")[0] for r in results} == {mesh.shop_client.ip}

        flows = mesh.cli_json("connections")
        by_client = {f["client"]: f for f in flows}
        for r in results:
            flow = by_client[r["local"]]  # the client's side of the redirected socket
            assert flow["original_dst"] == WEB
            assert flow["pod"] == "shop/client"
            assert flow["pod_ip"] == mesh.shop_client.ip
            assert flow["service"] == "shop/web"
            assert flow["endpoint"].endswith(f":{WEB_TARGET}")
        assert len({f["client"] for f in flows if f["original_dst"] == WEB}) == 30
    finally:
        mesh.release(proc)
    assert mesh.counter("connect4", "redirected") - before == 30
    mesh.wait_for(lambda: not mesh.cli_json("connections"), what="flows to close")


def _rules(run) -> dict[str, list[str]]:  # type: ignore[no-untyped-def]
    """nftables ruleset and iptables rules (nft and legacy backends) as one netns sees them."""
    out = {}
    nft = run(["nft", "list", "ruleset"])
    assert nft.returncode == 0, nft.stderr
    out["nft"] = [ln for ln in nft.stdout.splitlines() if ln.strip()]
    for tool in ("iptables-save", "iptables-legacy-save"):
        res = run([tool])
        assert res.returncode == 0, f"{tool}: {res.stderr}"
        out[tool] = [ln for ln in res.stdout.splitlines() if ln.startswith("-A")]
    return out


def _host_run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


def test_nodemesh_installs_no_iptables_or_nftables_rules(mesh: Scenario) -> None:
    host_before = _rules(_host_run)
    # Traffic through the mesh while we look: redirection is the BPF program's alone.
    assert mesh.app(mesh.shop_client, "probe", "--target", WEB)["ok"]
    places = [mesh.sb.node, *mesh.sb.pods.values()]
    for place in places:
        assert place is not None
        rules = _rules(place.run)
        assert rules == {"nft": [], "iptables-save": [], "iptables-legacy-save": []}, \
            f"rules in {place.netns_name}: {rules}"
    assert _rules(_host_run) == host_before  # the host netns: unchanged by nodemesh


def test_unlabelled_namespace_is_not_redirected(mesh: Scenario) -> None:
    before = mesh.counter("connect4", "redirected")
    not_enrolled = mesh.counter("connect4", "pass_not_enrolled")
    target = f"{mesh.webs[0].ip}:{WEB_TARGET}"
    proc, held = mesh.hold(mesh.legacy_client, target, 5)
    try:
        assert all(r["ok"] for r in held["results"]), held
        assert {r["server"] for r in held["results"]} == {"web-0"}
        assert mesh.cli_json("connections") == []
    finally:
        mesh.release(proc)
    assert mesh.counter("connect4", "redirected") == before
    assert mesh.counter("connect4", "pass_not_enrolled") - not_enrolled == 5


def test_unlabelled_namespace_cannot_reach_a_vip_directly(mesh: Scenario) -> None:
    """VIPs are routed nowhere: only the redirect makes them answer."""
    res = mesh.app(mesh.legacy_client, "probe", "--target", WEB)
    assert not res["ok"]
    assert res["errno"] in (101, 113)  # ENETUNREACH / EHOSTUNREACH, at once


def test_enrolled_pod_to_non_service_address_goes_direct(mesh: Scenario) -> None:
    before = mesh.counter("connect4", "redirected")
    not_service = mesh.counter("connect4", "pass_not_service")
    res = mesh.app(mesh.shop_client, "probe", "--target", f"{mesh.webs[1].ip}:{WEB_TARGET}")
    assert res["ok"], res
    assert '"server": "web-1"' in res["data"]
    assert mesh.counter("connect4", "redirected") == before
    assert mesh.counter("connect4", "pass_not_service") == not_service + 1


def test_proxy_marked_sockets_and_udp_are_never_redirected(mesh: Scenario) -> None:
    """The proxy's own sockets (SO_MARK 0x539) and non-TCP sockets pass untouched,
    even from an enrolled pod to a mesh VIP (so they find no route)."""
    before = mesh.counter("connect4", "redirected")
    proxy = mesh.counter("connect4", "pass_proxy")
    other = mesh.counter("connect4", "pass_other")
    marked = mesh.app(mesh.shop_client, "probe", "--target", WEB, "--mark", "0x539")
    assert not marked["ok"] and marked["errno"] in (101, 113), marked
    udp = mesh.app(mesh.shop_client, "probe", "--target", WEB, "--udp")
    assert not udp["ok"] and udp["errno"] in (101, 113), udp
    assert mesh.counter("connect4", "pass_proxy") == proxy + 1
    assert mesh.counter("connect4", "pass_other") == other + 1
    assert mesh.counter("connect4", "redirected") == before


def test_dual_stack_client_is_redirected_too(mesh: Scenario) -> None:
    """An AF_INET6 socket connecting to ::ffff:<VIP> (grpcio and Java do this)
    goes through connect6 and the same proxy; unenrolled pods stay untouched."""
    before = mesh.counter("connect4", "redirected")
    res = mesh.app(mesh.shop_client, "probe", "--target", WEB, "--v4mapped")
    assert res["ok"] and '"server": "web-' in res["data"], res
    assert mesh.counter("connect4", "redirected") == before + 1
    legacy = mesh.app(mesh.legacy_client, "probe", "--target", WEB, "--v4mapped")
    assert not legacy["ok"]


def test_opted_out_pod_is_not_enrolled(mesh: Scenario) -> None:
    rows = {r["pod"]: r for r in mesh.cli_json("workloads")}
    assert rows["shop/batch"]["enrolled"] is False
    assert "opted out" in rows["shop/batch"]["reason"]
    assert rows["legacy/client"]["enrolled"] is False
    assert rows["shop/client"]["enrolled"] is True
    before = mesh.counter("connect4", "redirected")
    res = mesh.app(mesh.optout, "probe", "--target", WEB)
    assert not res["ok"]  # not redirected, so the VIP is unreachable
    assert mesh.counter("connect4", "redirected") == before


def test_byte_exact_concurrent_flows_with_half_close(mesh: Scenario) -> None:
    before = mesh.counter("connect4", "redirected")
    res = mesh.app(mesh.shop_client, "flood", "--target", f"{ECHO_VIP}:{ECHO_PORT}",
                   "--flows", "64", "--size", str(8 << 20), timeout=600)
    flows = res["flows"]
    assert len(flows) == 64
    bad = [f for f in flows if not f.get("match")]
    assert bad == [], bad[:3]
    # The echo server sends its trailer only after it saw the client's EOF.
    assert all(f["trailer_ok"] for f in flows), [f["trailer"] for f in flows][:3]
    assert mesh.counter("connect4", "redirected") - before == 64  # through the proxy


def test_stopped_endpoint_is_skipped(mesh: Scenario) -> None:
    victim = mesh.webs[2]
    mesh.stop_server(victim)
    try:
        proc, held = mesh.hold(mesh.shop_client, WEB, 12)
        mesh.release(proc)
        assert all(r["ok"] for r in held["results"]), held
        assert {r["server"] for r in held["results"]} == {"web-0", "web-1"}
    finally:
        mesh.start_server(victim, ["whoami", "--port", str(WEB_TARGET), "--name", victim.name])


@pytest.mark.parametrize("how", ["no endpoints", "none ready"])
def test_no_ready_endpoint_fails_fast(mesh: Scenario, how: str) -> None:
    if how == "no endpoints":
        mesh.write_web_endpoints([])
    else:
        mesh.manifests.endpoint_slice("shop", "web", mesh.webs, [(WEB_PORT_NAME, WEB_TARGET)], ready=False)
    try:
        mesh.wait_for(lambda: _backends(mesh) == [], what="web to lose its ready endpoints")
        res = mesh.app(mesh.shop_client, "probe", "--target", WEB, "--timeout", "5")
        assert not res["ok"], res
        assert res["error"] in ("Connection reset by peer", "closed"), res
        assert res["seconds"] < 1.0, res
    finally:
        mesh.write_web_endpoints(mesh.webs)
        mesh.wait_for(lambda: len(_backends(mesh) or []) == 3, what="web endpoints back")


def test_all_endpoint_servers_down_fails_fast(mesh: Scenario) -> None:
    """Endpoints still listed as ready, but nothing listens: every connect is
    refused, the bounded retries end, the client is reset within a second."""
    for w in mesh.webs:
        mesh.stop_server(w)
    try:
        res = mesh.app(mesh.shop_client, "probe", "--target", WEB, "--timeout", "5")
        assert not res["ok"] and res["seconds"] < 1.0, res
    finally:
        for w in mesh.webs:
            mesh.start_server(w, ["whoami", "--port", str(WEB_TARGET), "--name", w.name])


def _backends(mesh: Scenario) -> list[str] | None:
    for s in mesh.cli_json("status")["services"]:
        if s["service"] == "shop/web":
            return s["backends"]
    return None


def test_endpoint_changes_take_effect_without_restart(mesh: Scenario) -> None:
    pid = mesh.cli_json("status")["pid"]
    mesh.write_web_endpoints(mesh.webs[:1])
    try:
        mesh.wait_for(lambda: _backends(mesh) == [f"{mesh.webs[0].ip}:{WEB_TARGET}"],
                      what="one endpoint")
        proc, held = mesh.hold(mesh.shop_client, WEB, 6)
        mesh.release(proc)
        assert {r["server"] for r in held["results"]} == {"web-0"}
    finally:
        mesh.write_web_endpoints(mesh.webs)
    mesh.wait_for(lambda: len(_backends(mesh) or []) == 3, what="three endpoints")
    proc, held = mesh.hold(mesh.shop_client, WEB, 9)
    mesh.release(proc)
    assert {r["server"] for r in held["results"]} == {"web-0", "web-1", "web-2"}
    assert mesh.cli_json("status")["pid"] == pid


def test_service_removed_and_added_updates_bpf_map(mesh: Scenario) -> None:
    """Removing a Service stops the redirect (the VIP is unreachable again);
    adding it back restores it, with no agent restart."""
    svc_file = mesh.dir / "svc-shop-web.yaml"
    saved = svc_file.read_text()
    mesh.manifests.remove("svc-shop-web.yaml")
    try:
        mesh.wait_for(lambda: _backends(mesh) is None, what="web to disappear")
        res = mesh.app(mesh.shop_client, "probe", "--target", WEB)
        assert not res["ok"] and res["errno"] in (101, 113), res
    finally:
        svc_file.write_text(saved)
    mesh.wait_for(lambda: len(_backends(mesh) or []) == 3, what="web back")
    assert mesh.app(mesh.shop_client, "probe", "--target", WEB)["ok"]


def test_pod_added_and_removed_is_enrolled_and_unenrolled(mesh: Scenario) -> None:
    newcomer = mesh.sb.add_pod("late", "shop")
    path = mesh.manifests.pod(newcomer)

    def enrolled() -> bool | None:
        rows = {r["pod"]: r for r in mesh.cli_json("workloads")}
        return rows.get("shop/late", {}).get("enrolled")

    mesh.wait_for(enrolled, what="shop/late enrolled")
    res = mesh.app(newcomer, "probe", "--target", WEB)
    assert res["ok"], res
    path.unlink()
    mesh.wait_for(lambda: "shop/late" not in {r["pod"] for r in mesh.cli_json("workloads")},
                  what="shop/late gone")
    res = mesh.app(newcomer, "probe", "--target", WEB)
    assert not res["ok"], "a removed pod must no longer be redirected"


def test_malformed_yaml_is_reported_and_the_rest_keeps_working(mesh: Scenario) -> None:
    bad = mesh.dir / "zz-broken.yaml"
    bad.write_text("kind: Pod\nmetadata: {name: [unclosed\n")
    try:
        mesh.wait_for(lambda: mesh.cli_json("status")["config_problems"], what="the problem")
        problems = mesh.cli_json("status")["config_problems"]
        assert len(problems) == 1 and "zz-broken.yaml" in problems[0]
        assert "line" in problems[0]
        assert mesh.app(mesh.shop_client, "probe", "--target", WEB)["ok"]
        log = mesh.log_text()
        assert "zz-broken.yaml" in log and "Traceback" not in log
    finally:
        bad.unlink()
    mesh.wait_for(lambda: not mesh.cli_json("status")["config_problems"], what="problem cleared")


def test_bad_edit_keeps_last_good_content_of_that_file(mesh: Scenario) -> None:
    eps = mesh.dir / "eps-shop-web.yaml"
    good = eps.read_text()
    eps.write_text(good + "\n  - this: is: not yaml\n")
    try:
        mesh.wait_for(lambda: mesh.cli_json("status")["config_problems"], what="the problem")
        assert len(_backends(mesh) or []) == 3
        assert mesh.app(mesh.shop_client, "probe", "--target", WEB)["ok"]
    finally:
        eps.write_text(good)
    mesh.wait_for(lambda: not mesh.cli_json("status")["config_problems"], what="problem cleared")


def test_pod_with_missing_netns_is_reported_not_fatal(mesh: Scenario) -> None:
    ghost = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "ghost", "namespace": "shop",
                     "annotations": {"nodemesh.io/netns": "/var/run/netns/nmsb-does-not-exist"}},
        "spec": {"nodeName": "node-1"}, "status": {"podIP": "198.18.0.250"},
    }
    mesh.manifests.write("pod-ghost.yaml", ghost)
    try:
        def reason() -> str | None:
            rows = {r["pod"]: r for r in mesh.cli_json("workloads")}
            row = rows.get("shop/ghost")
            return row["reason"] if row and "not found" in row["reason"] else None

        why = mesh.wait_for(reason, what="ghost reported")
        assert "/var/run/netns/nmsb-does-not-exist" in why and "is the pod running" in why
        assert mesh.cli_json("status")["pid"]  # the agent is alive
        lines = [ln for ln in mesh.log_text().splitlines() if "shop/ghost" in ln]
        assert len(lines) == 1, lines  # reported once, not every retry
        assert mesh.app(mesh.shop_client, "probe", "--target", WEB)["ok"]
    finally:
        mesh.manifests.remove("pod-ghost.yaml")


def test_pod_whose_netns_vanishes_is_unenrolled(mesh: Scenario) -> None:
    """The netns is deleted while the manifest stays: the agent must let go of
    it (not keep a dead pod's netns alive) and say why."""
    from pyroute2 import netns as pyroute_netns

    pod = mesh.sb.add_pod("short-lived", "shop")
    mesh.manifests.pod(pod)
    try:
        def row() -> dict | None:  # type: ignore[type-arg]
            return {r["pod"]: r for r in mesh.cli_json("workloads")}.get("shop/short-lived")

        mesh.wait_for(lambda: (row() or {}).get("enrolled"), what="enrolled")
        pyroute_netns.remove(pod.netns_name)
        mesh.wait_for(lambda: not (row() or {"enrolled": True})["enrolled"], what="unenrolled")
        assert "not found" in (row() or {})["reason"]
    finally:
        mesh.manifests.remove(f"pod-shop-{pod.name}.yaml")


def test_netns_annotation_that_is_not_a_netns(mesh: Scenario) -> None:
    odd = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "odd", "namespace": "shop",
                        "annotations": {"nodemesh.io/netns": "/etc/hostname"}},
           "spec": {"nodeName": "node-1"}, "status": {"podIP": "198.18.0.251"}}
    mesh.manifests.write("pod-odd.yaml", odd)
    try:
        def reason() -> str | None:
            row = {r["pod"]: r for r in mesh.cli_json("workloads")}.get("shop/odd")
            return row["reason"] if row and "not a network namespace" in row["reason"] else None

        mesh.wait_for(reason, what="odd pod reported")
        assert mesh.app(mesh.shop_client, "probe", "--target", WEB)["ok"]
    finally:
        mesh.manifests.remove("pod-odd.yaml")


def test_cli_tables_render(mesh: Scenario) -> None:
    out = mesh.cli("status").stdout
    assert "nm_connect4" in out and "connect4" in out and str(mesh.sb.pods_cgroup) in out
    assert "ATTACHED" in out and "NOT FOUND" not in out
    out = mesh.cli("workloads").stdout
    assert "shop/client" in out and "opted out" in out
    proc, _ = mesh.hold(mesh.shop_client, WEB, 2)
    try:
        out = mesh.cli("connections").stdout
        assert WEB in out and "shop/client" in out
    finally:
        mesh.release(proc)


def test_kernel_reports_programs_at_the_run_cgroup_only(mesh: Scenario) -> None:
    """The programs are attached at the sandbox's cgroup and nowhere above it."""
    from agent.cgroupfs import cgroup2_mount

    here = subprocess.run(["bpftool", "-j", "cgroup", "show", str(mesh.sb.pods_cgroup)],
                          capture_output=True, text=True, check=True).stdout
    assert "nm_connect4" in here and "nm_sockops" in here
    root = subprocess.run(["bpftool", "cgroup", "show", str(cgroup2_mount())],
                          capture_output=True, text=True, check=True).stdout
    assert "nm_" not in root
