"""`nodemesh demo`: a virtual node, meshed, shown through the CLI, torn down.

Everything it builds lives in network namespaces and a cgroup subtree named
after the run, and is removed on every exit path (errors, Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import collections
import os
import signal
import sys
import time
from typing import Any

from nodemesh.errors import UserError


def _step(t0: float, text: str) -> None:
    print(f"\n[{time.monotonic() - t0:5.1f}s] {text}", flush=True)


_MAIN_PID = os.getpid()


def _sigterm(*_: Any) -> None:
    # Forked helpers (pyroute2 forks to create a netns) inherit this handler:
    # they must just die, not unwind the demo's teardown a second time.
    if os.getpid() != _MAIN_PID:
        os._exit(0)
    raise KeyboardInterrupt


def run_demo(connections: int = 30) -> int:
    if os.geteuid() != 0:
        raise UserError("the demo builds network namespaces and loads BPF: run it as root")
    from agent.bpf_loader import preflight

    preflight()
    from sandbox.node import Sandbox, leftovers
    from sandbox.scenario import WEB_PORT, WEB_TARGET, WEB_VIP, Scenario

    global _MAIN_PID
    _MAIN_PID = os.getpid()
    signal.signal(signal.SIGTERM, _sigterm)
    t0 = time.monotonic()
    _step(t0, "building a virtual node from network namespaces and cgroups")
    with Sandbox() as sb:
        sc = Scenario(sb).build()
        print(f"  run {sb.run_id}: node netns {sb.prefix}-node, {len(sb.pods)} pods on bridge "
              f"198.18.0.0/24, cgroup subtree {sb.cgroup_root}")
        print("  namespace shop   (nodemesh.io/mesh=enabled): client, batch (opted out), "
              "web-0..2, echo")
        print("  namespace legacy (no label):                client")
        print(f"  service shop/web  {WEB_VIP}:{WEB_PORT} -> "
              + ", ".join(f"{w.ip}:{WEB_TARGET}" for w in sc.webs))

        _step(t0, "starting the agent (BPF compile, attach under the run's cgroup, enroll pods)")
        sc.start_agent()
        print(sc.cli("workloads").stdout, end="")

        _step(t0, f"shop/client opens {connections} connections to web at {WEB_VIP}:{WEB_PORT}")
        before = sc.counter("connect4", "redirected")
        proc, held = sc.hold(sc.shop_client, f"{WEB_VIP}:{WEB_PORT}", connections)
        try:
            results = held["results"]
            ok = [r for r in results if r.get("ok")]
            print(f"  {len(ok)}/{len(results)} succeeded; what the endpoints saw:")
            spread = collections.Counter((r["server"], r["peer"].split(":")[0]) for r in ok)
            for (server, peer), n in sorted(spread.items()):
                print(f"    {server}: {n:3d} connections, peer address {peer} "
                      f"(the client pod's own IP: {sc.shop_client.ip})")
            print("\n  $ nodemesh connections   (while they are open; first 6 of them)")
            lines = sc.cli("connections").stdout.rstrip().splitlines()
            print("  " + "\n  ".join(lines[:7]))
            flows = sc.cli_json("connections")
            by_ep = collections.Counter(f["endpoint"] for f in flows)
            print(f"  ... {len(flows)} meshed flows, original destination "
                  f"{sorted({f['original_dst'] for f in flows})}, spread over endpoints: "
                  + ", ".join(f"{ep} x{n}" for ep, n in sorted(by_ep.items())))
        finally:
            sc.release(proc)
        after = sc.counter("connect4", "redirected")
        print(f"\n  connect4 redirect counter: {before} -> {after}")

        _step(t0, "legacy/client (namespace not in the mesh)")
        direct = sc.app(sc.legacy_client, "probe", "--target", f"{sc.webs[0].ip}:{WEB_TARGET}")
        print(f"  to endpoint {sc.webs[0].ip}:{WEB_TARGET} directly: "
              f"{'ok' if direct['ok'] else direct}, not redirected "
              f"(counter still {sc.counter('connect4', 'redirected')}, "
              f"{len(sc.cli_json('connections'))} meshed flows)")
        vip = sc.app(sc.legacy_client, "probe", "--target", f"{WEB_VIP}:{WEB_PORT}")
        print(f"  to the VIP {WEB_VIP}:{WEB_PORT}: {vip.get('error', 'ok')} "
              "(VIPs are routed nowhere; only the mesh answers them)")

        _step(t0, "$ nodemesh status")
        print(sc.cli("status").stdout, end="")

        _step(t0, "stopping the agent (it unenrolls pods, detaches BPF, removes its pins)")
        rc = sc.stop_agent()
        print(f"  agent exited with {rc}")
        _step(t0, "tearing the virtual node down")
    left = leftovers()
    if left:
        print("  left behind: " + "; ".join(left), file=sys.stderr)
        return 1
    print(f"  nothing left behind. Demo done in {time.monotonic() - t0:.1f}s.")
    return 0
