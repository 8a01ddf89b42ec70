"""Nothing is left behind: agent stop and crash, sandbox failure and sweep,
and the demo, interrupted or not (root)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.instance import Instance
from sandbox.node import NETNS_DIR, Sandbox, leftovers, sweep
from sandbox.scenario import WEB_PORT, WEB_VIP, Scenario

pytestmark = pytest.mark.root
REPO = Path(__file__).resolve().parent.parent
WEB = f"{WEB_VIP}:{WEB_PORT}"


def attached(cgroup: Path) -> list[dict[str, object]]:
    out = subprocess.run(["bpftool", "-j", "cgroup", "show", str(cgroup)],
                         capture_output=True, text=True, check=False).stdout.strip()
    return json.loads(out) if out else []


def test_agent_stop_detaches_unpins_and_stops_redirecting(fresh_scenario: Scenario) -> None:
    sc = fresh_scenario
    sc.start_agent()
    inst = Instance(sc.instance)
    assert inst.pin_dir.is_dir() and len(attached(sc.sb.pods_cgroup)) == 3
    assert sc.app(sc.shop_client, "probe", "--target", WEB)["ok"]
    assert sc.stop_agent() == 0
    assert not inst.pin_dir.exists()
    assert not inst.run_dir.exists()
    assert attached(sc.sb.pods_cgroup) == []
    res = sc.app(sc.shop_client, "probe", "--target", WEB)
    assert not res["ok"] and res["errno"] in (101, 113)  # no longer redirected
    assert "Traceback" not in sc.log_text()


def test_agent_raises_its_open_file_limit_to_the_hard_limit(fresh_scenario: Scenario) -> None:
    """Started from a shell with a soft limit of 512 (hard 4096), the agent runs
    with 4096: a node's worth of proxied connections needs more than 512."""
    sc = fresh_scenario
    argv = sc.agent_argv()
    sc.agent_argv = lambda: ["prlimit", "--nofile=512:4096", *argv]  # type: ignore[method-assign]
    sc.start_agent()
    assert sc.agent is not None
    limits = Path(f"/proc/{sc.agent.pid}/limits").read_text()
    row = next(line for line in limits.splitlines() if line.startswith("Max open files"))
    assert row.split()[3:5] == ["4096", "4096"], row
    assert sc.app(sc.shop_client, "probe", "--target", WEB)["ok"]


def test_crashed_agent_is_cleaned_by_uninstall(fresh_scenario: Scenario) -> None:
    sc = fresh_scenario
    sc.start_agent()
    assert sc.agent is not None
    sc.agent.kill()  # SIGKILL: no chance to clean up
    sc.agent.wait(10)
    inst = Instance(sc.instance)
    assert inst.pin_dir.is_dir()
    assert len(attached(sc.sb.pods_cgroup)) == 3  # the pinned programs stay attached
    res = sc.cli("uninstall", "--instance", sc.instance)
    assert "detached connect4" in res.stdout and "detached sock_ops" in res.stdout
    assert "detached connect6" in res.stdout
    assert attached(sc.sb.pods_cgroup) == []
    assert not inst.pin_dir.exists()
    again = sc.cli("uninstall", "--instance", sc.instance)
    assert "nothing to remove" in again.stdout


def test_a_second_agent_with_the_same_instance_is_refused(fresh_scenario: Scenario) -> None:
    sc = fresh_scenario
    sc.start_agent()
    assert sc.sb.node is not None
    res = sc.sb.node.run(sc.agent_argv(), timeout=60)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert f"pid {sc.agent.pid}" in res.stderr and "is running" in res.stderr  # type: ignore[union-attr]
    # ... and it touched nothing of the first one's.
    assert sc.cli_json("status")["pid"] == sc.agent.pid  # type: ignore[union-attr]
    assert len(attached(sc.sb.pods_cgroup)) == 3
    assert sc.app(sc.shop_client, "probe", "--target", WEB)["ok"]
    refused = sc.cli("uninstall", "--instance", sc.instance, check=False)
    assert refused.returncode == 1 and "is running" in refused.stderr


def test_agent_restarted_after_a_crash_cleans_up_and_serves(fresh_scenario: Scenario) -> None:
    sc = fresh_scenario
    sc.start_agent()
    assert sc.agent is not None
    sc.agent.kill()
    sc.agent.wait(10)
    sc.start_agent()
    assert "cleaned up after a previous agent" in sc.log_text()
    assert len(attached(sc.sb.pods_cgroup)) == 3  # the old pair went, a new pair came
    assert sc.app(sc.shop_client, "probe", "--target", WEB)["ok"]


def _run_gone(run_id: str) -> bool:
    return not any(run_id in item for item in leftovers())


def test_sandbox_teardown_runs_when_the_body_fails() -> None:
    run_id = None
    with pytest.raises(RuntimeError, match="boom"), Sandbox() as sb:
        run_id = sb.run_id
        pod = sb.add_pod("p", "ns")
        pod.spawn(["sleep", "300"])
        raise RuntimeError("boom")
    assert run_id is not None and _run_gone(run_id)


def test_sweep_removes_a_crashed_runs_leftovers() -> None:
    sb = Sandbox()
    sb.create()
    pod = sb.add_pod("p", "ns")
    sleeper = pod.spawn(["sleep", "300"])
    # Pretend the owner died: its marker names a pid that is gone.
    dead = subprocess.Popen(["true"])
    dead.wait()
    sb.marker.write_text(json.dumps({"pid": dead.pid, "started": time.time()}))
    assert (NETNS_DIR / pod.netns_name).exists()
    assert sb.run_id in sweep()
    assert _run_gone(sb.run_id)
    assert sleeper.wait(5) == -signal.SIGKILL  # ended through the run's own cgroup
    sb.teardown()  # idempotent after a sweep


def test_sweep_leaves_live_runs_alone() -> None:
    with Sandbox() as sb:
        sb.add_pod("p", "ns")
        assert sb.run_id not in sweep()
        assert not _run_gone(sb.run_id)


def test_demo_command_runs_and_leaves_nothing() -> None:
    """The README's demo command, exactly, within the minute the issue allows."""
    t0 = time.monotonic()
    res = subprocess.run([str(REPO / "scripts" / "demo.sh")], capture_output=True, text=True,
                         timeout=180, check=False)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert time.monotonic() - t0 < 60
    out = res.stdout
    assert "30/30 succeeded" in out
    for name in ("web-0", "web-1", "web-2"):
        assert f"{name}:  10 connections" in out
    assert "connect4 redirect counter: 0 -> 30" in out
    assert "nothing left behind" in out
    assert leftovers() == []


def test_interrupted_demo_leaves_nothing() -> None:
    proc = subprocess.Popen([str(Path(sys.executable).with_name("nodemesh")), "demo"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "opens 30 connections" in line:
            break
    os.kill(proc.pid, signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert any("starting the agent" in ln for ln in seen)
    assert leftovers() == []
