"""The benchmark's command line and the run from start to results folder."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import report, tools
from bench.scenarios import FULL, QUICK, SCENARIO_HELP, SCENARIO_PEERS, SCENARIOS, Params, Runner
from bench.topology import (
    ENGINE_PEERS,
    ENGINES,
    EPHEMERAL_PORTS,
    PEER_DESCRIPTIONS,
    PEERS,
    SERVICES,
    VIP,
    BenchNode,
)

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"

DESCRIPTION = """\
nodemesh benchmark: the mesh against its peers, side by side, in ONE run.

Builds one virtual node (network namespaces + a cgroup subtree, see
sandbox/node.py), a server pod (sockperf, iperf3, nginx HTTP/1.1 and h2c, an
echo server, a grpcio server) and one client pod per peer, then measures every
peer back to back in each scenario:

  direct                 no mesh: client -> server pod IP
  sidecar-haproxy        iptables REDIRECT in the client pod's own netns to an
                         HAProxy inside that pod (nbthread 1; mode tcp, and
                         mode http on the L7 ports)
  node-haproxy-iptables  iptables DNAT in the client pod's netns to ONE HAProxy
                         in the node netns on the bridge address 198.18.0.1
  nodemesh               the real agent: eBPF connect4 redirect to its node
                         proxy (userspace L4 engine); client in an enrolled namespace
  nodemesh-sockmap       a second agent, --l4-engine sockmap (experimental)
  nodemesh-splice        a third agent, --l4-engine splice
                         (an engine the agent does not offer is left out)

Scenarios:
""" + "\n".join(f"  {k:11s} {v}" for k, v in SCENARIO_HELP.items()) + """

Results go to bench/results/<YYYY-MM-DD>-<hostname>/: results.json (every
sample, machine facts, tool versions, the exact command, the L4 engine
decision), results.md (absolute values and ratios against `direct` from the
same run, the decision), PNG plots, and raw/ (every tool's output, not
committed). Only ratios within one run mean much: these machines are small
and noisy.
"""

EPILOG = """\
examples:
  sudo .venv/bin/python -m bench --quick          under 2 minutes, one round
  sudo .venv/bin/python -m bench                  full: 3 rounds, under 15 minutes
  sudo .venv/bin/python -m bench --quick --only latency,http

needs: root, and scripts/setup.sh done (BCC, kernel headers, bpffs, and the
peers from Debian: haproxy, iperf3, wrk, nginx, sockperf, nghttp2-client). Traffic only ever
goes to sandbox addresses (198.18.0.0/24 pods, 198.19.0.0/16 VIPs); iptables
rules only inside sandbox pod netns. Everything is removed on every exit path,
Ctrl-C included. Not part of the test suite. See bench/README.md.
"""


class BenchError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="short samples, one round, 10/50 pods for memory: under 2 minutes "
                        "(default: full mode, 3 rounds, under 15 minutes)")
    p.add_argument("--only", metavar="LIST",
                   help="comma-separated subset of scenarios: " + ",".join(SCENARIOS))
    p.add_argument("--rounds", type=int, metavar="N",
                   help="rounds of every traffic scenario (default: 1 quick, 3 full); the table "
                        "shows the median")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="results folder (default: bench/results/<YYYY-MM-DD>-<hostname>/, "
                        "replaced if it exists)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return p


def _say_factory(t0: float) -> Any:
    def say(text: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f}s] {text}", flush=True)
    return say


def _version(argv: tuple[str, ...], pattern: str) -> str:
    try:
        res = subprocess.run(list(argv), capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "missing"
    m = re.search(pattern, res.stdout + res.stderr)
    return m.group(1) if m else "unknown"


def machine_facts() -> dict[str, Any]:
    cpu_model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_total = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) * 1024
    commit = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        commit = head + ("+dirty" if dirty else "")
    py = {}
    for mod in ("uvloop", "psutil", "pyroute2", "matplotlib"):
        try:
            from importlib.metadata import version
            py[mod] = version(mod)
        except Exception:  # noqa: BLE001 - a fact, not a failure
            py[mod] = "missing"
    return {
        "hostname": socket.gethostname(),
        "kernel": platform.release(),
        "kernel_version": platform.version(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "mem_total_bytes": mem_total,
        "loadavg_at_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "python_packages": py,
        "tools": {v.tool: _version(v.argv, v.pattern) for v in tools.VERSIONS},
        "nodemesh_commit": commit,
    }


def _prepare_out(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    # Only what this harness writes: other benchmarks (bench/xds_bench.py)
    # share the folder.
    for f in ("results.json", "results.md", *report.PLOTS):
        (out / f).unlink(missing_ok=True)
    raw = out / "raw"
    shutil.rmtree(raw, ignore_errors=True)
    raw.mkdir()
    return raw


_MAIN_PID = os.getpid()


def _interrupt(signum: int, _frame: Any) -> None:
    # Forked helpers (pyroute2's netns workers) inherit this handler and are
    # ended with SIGTERM: they must die as by default, not unwind our stack
    # (whose finally blocks would tear the sandbox down from the child).
    if os.getpid() != _MAIN_PID:
        os._exit(128 + signum)
    raise KeyboardInterrupt(f"signal {signum}")


def _hold(signum: int, _frame: Any) -> None:
    """While tearing down: children die as by default, the main process goes on."""
    if os.getpid() != _MAIN_PID:
        os._exit(128 + signum)
    print("bench: still tearing the sandbox down, one moment", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise BenchError("run it as root: it builds network namespaces and loads BPF "
                         "(sudo .venv/bin/python -m bench --quick)")
    missing = [t.tool for t in tools.VERSIONS if shutil.which(t.tool) is None]
    missing += [t for t in ("iptables", "ss", "curl", "bpftool") if shutil.which(t) is None]
    if missing:
        raise BenchError(f"missing {', '.join(missing)}: run scripts/setup.sh (it installs the "
                         "Debian packages the benchmark drives)")
    from agent.bpf_loader import preflight
    from nodemesh.errors import UserError

    try:
        preflight()
    except UserError as exc:
        raise BenchError(str(exc)) from None
    params: Params = QUICK if args.quick else FULL
    if args.rounds:
        params = Params(**{**params.as_dict(), "rounds": args.rounds})
    selected = list(SCENARIOS)
    if args.only:
        selected = [s.strip() for s in args.only.split(",") if s.strip()]
        bad = [s for s in selected if s not in SCENARIOS]
        if bad:
            raise BenchError(f"unknown scenario {', '.join(bad)}; choose from {', '.join(SCENARIOS)}")
        # Always in the documented order: memory last (it stops the further engines' agents).
        selected = [s for s in SCENARIOS if s in selected]

    from sandbox.node import Sandbox, leftovers

    t0 = time.monotonic()
    started = datetime.datetime.now().astimezone()
    host = socket.gethostname()
    run_name = f"{started:%Y-%m-%d}-{host}"
    out = args.out or RESULTS / run_name
    raw = _prepare_out(out)
    say = _say_factory(t0)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    facts = machine_facts()
    if not args.no_plots:
        # matplotlib takes seconds to import: meanwhile, while the agents compile.
        threading.Thread(target=report.preload_matplotlib, daemon=True).start()
    say(f"{params.mode} mode: {', '.join(selected)}; {params.rounds} round(s); results -> {out}")
    workdir = Path(tempfile.mkdtemp(prefix="nodemesh-bench-"))
    runner: Runner | None = None
    run_id = None
    agent_argvs: dict[str, list[str]] = {}
    scenario_dirs: list[Path] = []
    node: BenchNode | None = None
    try:
        with Sandbox() as sb:
            run_id = sb.run_id
            node = BenchNode(sb, workdir, raw)
            scenario_dirs = node.scratch_paths()
            say(f"sandbox {sb.run_id}: node netns {sb.prefix}-node, cgroup {sb.cgroup_root}")
            try:
                node.build(say, peers_needed={p for sc in selected for p in SCENARIO_PEERS[sc]})
                scenario_dirs = node.scratch_paths()
                agent_argvs = node.agent_argvs()
                say(f"{len(node.peers)} peers answer through their own path ({', '.join(node.peers)}); "
                    "measuring")
                runner = Runner(node, params, raw, say, deadline=t0 + params.budget_seconds)
                for name in selected:
                    say(f"{name}: {SCENARIO_HELP[name]}")
                    {"latency": runner.latency, "bulk": runner.bulk, "connrate": runner.connrate,
                     "http": runner.http, "http-paced": runner.http_paced,
                     "integrity": runner.integrity, "http-l7": runner.http_l7, "h2": runner.h2,
                     "grpc": runner.grpc, "memory": runner.memory_scan}[name]()
            finally:
                # Teardown must not be cut short by a second Ctrl-C.
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                    signal.signal(sig, _hold)
                node.stop()
                node.copy_logs(raw)
                say("tearing the sandbox down")
    except KeyboardInterrupt:
        say("interrupted: the sandbox was torn down; no results written")
        return 130
    except RuntimeError as exc:
        say(f"failed: {exc}")
        say("the sandbox was torn down; no results written")
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        shutil.rmtree(workdir, ignore_errors=True)
        for d in scenario_dirs:
            if d.is_dir():
                shutil.rmtree(d, ignore_errors=True)
            else:
                d.unlink(missing_ok=True)
    left = [x for x in leftovers() if run_id and run_id in x]
    if left:
        say("LEFT BEHIND: " + "; ".join(left))
    assert runner is not None and node is not None
    finished = datetime.datetime.now().astimezone()
    engines = {e: {"peer": ENGINE_PEERS[e], "offered": e in node.engines_offered,
                   "in_run": ENGINE_PEERS[e] in node.peers,
                   **({"left_out": node.engines_missing[e]} if e in node.engines_missing else {})}
               for e in ENGINES}
    results: dict[str, Any] = {
        "schema": 1,
        "run_name": run_name,
        "mode": params.mode,
        "command": shlex.join(sys.orig_argv),
        "argv": sys.orig_argv,
        "cwd": os.getcwd(),
        "started": started.isoformat(timespec="seconds"),
        "finished": finished.isoformat(timespec="seconds"),
        "duration_seconds": round(time.monotonic() - t0, 1),
        "scenarios": selected,
        "params": params.as_dict(),
        "machine": facts,
        "peers": {p: {"description": PEER_DESCRIPTIONS[p], "in_run": p in node.peers,
                      "scenarios": [sc for sc in selected if p in SCENARIO_PEERS[sc]]}
                  for p in PEERS},
        "engines": engines,
        "engines_offered_by_agent": node.engines_help,
        "setup": {"agent_argv": agent_argvs.get("userspace", []), "agent_argvs": agent_argvs,
                  "vip": VIP, "services": {n: asdict(v) for n, v in SERVICES.items()},
                  "client_sysctls": {"net.ipv4.tcp_tw_reuse": "1",
                                     "net.ipv4.ip_local_port_range": EPHEMERAL_PORTS},
                  "haproxy_global": tools.HAPROXY_GLOBAL},
        "sandbox_run_id": run_id,
        "left_behind": left,
        "samples": runner.samples,
        "summary": report.summarize(runner.samples),
        "memory": runner.memory,
        "grpc_checks": runner.grpc_checks,
    }
    results["l4_engine_decision"] = report.decide(results)
    results["plots"] = [] if args.no_plots else report.plots(results, out)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(report.markdown(results))
    failed = [s for s in runner.samples if not s.get("ok")]
    failed += [r for key in ("pods", "services") for r in runner.memory.get(key, []) if "error" in r]
    say(f"done in {time.monotonic() - t0:.0f}s: {len(runner.samples)} samples "
        f"({len(failed)} failed or skipped, memory rows included); L4 engine decision: "
        f"{results['l4_engine_decision']['chosen']}; {out / 'results.md'}")
    return 1 if failed or left else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
