"""The `nodemesh` command: the daemon, inspection of a node, and the demo."""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from nodemesh import __version__
from nodemesh.errors import UserError
from nodemesh.output import human_bytes, table

DESCRIPTION = """\
nodemesh: a node-level, eBPF-assisted, sidecarless service mesh agent.

One agent per node steers enrolled pods' connections to mesh services into a
shared node proxy with eBPF (cgroup/connect4 + sockops), instead of iptables.
A namespace opts in with the label nodemesh.io/mesh=enabled; a pod opts out
with nodemesh.io/mesh=disabled.
"""

EPILOG = """\
examples:
  nodemesh demo                              build a virtual node, mesh it, show it, tear it down
  nodemesh agent --node-name node-1 --config-dir /etc/nodemesh/manifests \\
                 --cgroup-root /sys/fs/cgroup/kubepods.slice
  nodemesh status                            programs, maps, counters, enrolled pods
  nodemesh workloads -o json                 this node's pods and why each is (not) enrolled
  nodemesh connections                       live meshed flows
  nodemesh config                            xDS versions, ACK/NACK and resources
  nodemesh control-plane --config-dir DIR    serve xDS to agents, Envoy and proxyless gRPC
"""


def _add_instance(p: argparse.ArgumentParser) -> None:
    p.add_argument("--instance", default=os.environ.get("NODEMESH_INSTANCE", "default"),
                   help="agent instance name: pins live in /sys/fs/bpf/nodemesh/<instance>, the "
                        "admin socket in /run/nodemesh/<instance>/ (default: $NODEMESH_INSTANCE "
                        "or 'default')")


def _add_output(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", choices=("table", "json"), default="table",
                   help="table for people (default), json for scripts")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nodemesh", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"nodemesh {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("agent", help="run the node agent (root)",
                       description="Run the node agent: load and attach the BPF programs under "
                       "--cgroup-root, enroll this node's labelled pods, serve the node proxy "
                       "and the admin socket. SIGTERM or Ctrl-C detaches everything and exits.")
    _add_instance(p)
    p.add_argument("--node-name", default=os.environ.get("NODE_NAME") or socket.gethostname(),
                   help="this node's name; only pods with spec.nodeName equal to it are enrolled "
                        "(default: $NODE_NAME or the hostname)")
    p.add_argument("--config-dir", required=True, type=Path,
                   help="folder of Kubernetes-style YAML (Namespace, Pod, Service, EndpointSlice, "
                        "Endpoints), re-read when it changes")
    p.add_argument("--cgroup-root", required=True, type=Path,
                   help="cgroup v2 directory to attach under (the pods' parent cgroup, e.g. "
                        "kubepods); the machine's root cgroup is refused")
    p.add_argument("--xds-address", metavar="HOST:PORT",
                   help="an external xDS control plane (ADS over gRPC) to take services and "
                        "endpoints from; default: run nodemesh's own control plane embedded, on "
                        "--config-dir")
    p.add_argument("--xds-mode", choices=("delta", "sotw"), default="delta",
                   help="incremental (default; falls back to sotw when the control plane lacks "
                        "it) or state-of-the-world ADS")
    p.add_argument("--state-dir", type=Path,
                   help="where the last good xDS config is kept, to serve from when the control "
                        "plane is unreachable at start (default /var/lib/nodemesh/<instance>)")
    p.add_argument("--connect-timeout", type=float, default=1.0,
                   help="seconds to wait for an upstream connect before trying the next "
                        "endpoint (default 1.0)")
    p.add_argument("--sniff-window", type=float, default=0.25,
                   help="seconds an undeclared port waits for the client's first bytes to tell "
                        "HTTP from opaque TCP; server-first protocols wait this long (default 0.25)")
    p.add_argument("--metrics-address", default="0.0.0.0:15020", metavar="HOST:PORT",
                   help="where to serve Prometheus /metrics (Istio's standard metrics); "
                        "'' to turn off (default 0.0.0.0:15020)")
    p.add_argument("--l4-engine", choices=("userspace", "splice", "sockmap"), default="userspace",
                   help="how plain TCP flows are forwarded: 'userspace' (default) relays through "
                        "the proxy's buffers; 'splice' moves each direction socket -> pipe -> "
                        "socket with splice(2), no copy through user space; 'sockmap' "
                        "(EXPERIMENTAL) splices the two sockets in the kernel (SOCKHASH + sk_skb "
                        "stream verdict), the proxy keeping only EOF and half-close. "
                        "bench/README.md has what each passes and measures")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))

    for name, helptext in (
        ("status", "BPF programs and where they are attached, maps, counters, enrolled pods"),
        ("workloads", "this node's pods, and whether each is enrolled and why (or why not)"),
        ("connections", "live meshed flows: source pod, original destination, endpoint, bytes"),
        ("config", "the xDS config the agent applied: per type its version, last ACK or NACK "
                   "(with the reason) and the resources"),
    ):
        p = sub.add_parser(name, help=helptext, description=helptext[0].upper() + helptext[1:]
                           + ". Reads the running agent's admin socket.")
        _add_instance(p)
        _add_output(p)

    p = sub.add_parser("control-plane", help="run nodemesh's xDS control plane",
                       description="Serve Envoy v3 xDS (ADS, state of the world and delta) from a "
                       "folder of Kubernetes-style YAML, re-read when it changes. Agents use it "
                       "with --xds-address; so can Envoy and proxyless gRPC clients.")
    from controlplane.service import build_parser_args

    build_parser_args(p)

    p = sub.add_parser("check-config", help="validate a folder of manifests",
                       description="Parse every YAML file of a config folder as the agent would; "
                       "print one line per problem; exit 1 if there is any.")
    p.add_argument("config_dir", type=Path)

    p = sub.add_parser("uninstall", help="remove what a crashed agent left behind (root)",
                       description="Detach the instance's BPF programs from the cgroup it "
                       "attached to, and remove its pins and admin socket. A running agent "
                       "does this itself when it stops.")
    _add_instance(p)

    p = sub.add_parser("demo", help="build a virtual node, mesh it, show it, tear it down (root)",
                       description="Build a sandbox node from network namespaces and cgroups "
                       "(namespace 'shop' labelled for the mesh, 'legacy' not, a service 'web' "
                       "with three endpoints), run the agent, send traffic from both, print what "
                       "the CLI sees, and remove everything. Takes well under a minute.")
    p.add_argument("--connections", type=int, default=30,
                   help="connections each client makes (default 30)")
    return parser


def run_agent(args: argparse.Namespace) -> int:

    import uvloop

    from agent.bpf_loader import preflight
    from agent.cgroupfs import check_cgroup_root
    from agent.config import AgentConfig
    from agent.daemon import Agent
    from agent.instance import Instance

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s nodemesh %(levelname)s %(name)s: %(message)s")
    if os.geteuid() != 0:
        raise UserError("nodemesh agent must run as root (it loads BPF programs and enters pod netns)")
    if not os.path.isdir(args.config_dir):  # False (not an exception) when unreadable too
        raise UserError(f"config directory {args.config_dir} does not exist or is not a folder")
    preflight()
    _raise_fd_limit()
    config = AgentConfig(instance=Instance(args.instance), node_name=args.node_name,
                         config_dir=args.config_dir, cgroup_root=check_cgroup_root(args.cgroup_root),
                         xds_address=args.xds_address, xds_mode=args.xds_mode,
                         state_dir=args.state_dir, connect_timeout=args.connect_timeout,
                         sniff_window=args.sniff_window,
                         metrics_address=args.metrics_address or None,
                         l4_engine=args.l4_engine)
    agent = Agent(config)
    uvloop.run(agent.run())
    return 0


def _raise_fd_limit() -> None:
    """Up to the hard limit: the node proxy holds two sockets per proxied connection
    (four with the splice engine's pipes) plus a few ready ones per enrolled pod,
    for every pod of the node, where a shell's default soft limit is often 1024."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            logging.getLogger("nodemesh.agent").warning(
                "cannot raise the open-file limit from %d: %s", soft, exc)


def _admin(args: argparse.Namespace, endpoint: str) -> Any:
    from agent.instance import Instance
    from nodemesh.admin_client import get

    return get(Instance(args.instance).admin_socket, endpoint)


def _emit(args: argparse.Namespace, data: Any, render: Callable[[Any], str]) -> None:
    if args.output == "json":
        print(json.dumps(data, indent=2))
    else:
        print(render(data))


def cmd_status(args: argparse.Namespace) -> int:
    def render(s: dict[str, Any]) -> str:
        out = [f"agent    instance={s['instance']} node={s['node']} pid={s['pid']} "
               f"uptime={s['uptime_seconds']}s",
               f"config   {s['config_dir']} (reloads: {s['config_reloads']})"]
        out += [f"  problem: {p}" for p in s["config_problems"]]
        x = s["xds"]
        out.append(f"xds      {x['control_plane']}{' (embedded)' if x['embedded'] else ''} "
                   f"mode={x['mode']} connected={x['connected']} synced={x['synced']} "
                   f"source={x['source']} accepted={x['accepted']} rejected={x['rejected']}"
                   + (f" last_error={x['last_error']!r}" if x["last_error"] else ""))
        out += ["", "BPF programs (as the kernel reports them at the cgroup root)"]
        kernel = {(k.get("attach_type"), k.get("name")): k for k in s["kernel_attachments"]}
        rows = []
        for a in s["programs"]:
            k = next((v for (t, n), v in kernel.items() if n and a["program"].startswith(n)), None)
            rows.append({"program": a["program"], "hook": a["attach_type"], "cgroup": a["cgroup"],
                         "id": k.get("id") if k else None,
                         "attached": "yes" if k else ("map" if a["cgroup"].startswith("map ")
                                                      else "NOT FOUND"), "pin": a["pin"]})
        out.append(table(rows, [("program", "PROGRAM"), ("hook", "HOOK"), ("id", "ID"),
                                ("attached", "ATTACHED"), ("cgroup", "CGROUP"), ("pin", "PIN")]))
        out += ["", "maps"]
        out.append(table(s["maps"], [("map", "MAP"), ("entries", "ENTRIES"),
                                     ("max_entries", "MAX"), ("pin", "PIN")]))
        out += ["", "counters"]
        crow = [{"program": prog, "counter": name, "value": v}
                for prog, cs in s["counters"].items() for name, v in cs.items()]
        out.append(table(crow, [("program", "PROGRAM"), ("counter", "COUNTER"),
                                ("value", "VALUE")]))
        out += ["", f"enrolled pods ({len(s['enrolled'])})"]
        out.append(table(s["enrolled"], [("pod", "POD"), ("ip", "IP"), ("listener", "LISTENER"),
                                         ("netns", "NETNS")]))
        out += ["", f"mesh services ({len(s['services'])})"]
        out.append(table(s["services"], [("service", "SERVICE"), ("vip", "VIP"),
                                         ("backends", "READY ENDPOINTS")]))
        p = s["proxy"]
        out += ["", "proxy    " + " ".join(f"{k}={v}" for k, v in p.items())]
        return "\n".join(out)

    _emit(args, _admin(args, "/status"), render)
    return 0


def cmd_workloads(args: argparse.Namespace) -> int:
    _emit(args, _admin(args, "/workloads"), lambda rows: table(
        rows, [("pod", "POD"), ("ip", "IP"), ("enrolled", "ENROLLED"), ("reason", "WHY")]))
    return 0


def cmd_connections(args: argparse.Namespace) -> int:
    def render(rows: list[dict[str, Any]]) -> str:
        view = [dict(r, sent=human_bytes(r["bytes_sent"]), recv=human_bytes(r["bytes_received"]),
                     age=f"{r['age_seconds']:.1f}s") for r in rows]
        return table(view, [("pod", "SOURCE POD"), ("pod_ip", "POD IP"),
                            ("original_dst", "ORIGINAL DST"), ("service", "SERVICE"),
                            ("endpoint", "ENDPOINT"), ("state", "STATE"), ("sent", "SENT"),
                            ("recv", "RECEIVED"), ("age", "AGE")])

    _emit(args, _admin(args, "/connections"), render)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    def render(d: dict[str, Any]) -> str:
        out = [f"control plane {d['control_plane']}  mode={d['mode']} connected={d['connected']} "
               f"synced={d['synced']} source={d['source']} node={d['node']}"]
        if d["last_error"]:
            out.append(f"last error: {d['last_error']}")
        rows = []
        for short, t in d["types"].items():
            last = t["last"] or {}
            rows.append({"type": short, "count": t["count"], "version": t["version"] or None,
                         "last": last.get("status"), "nonce": last.get("nonce"),
                         "reason": last.get("reason")})
        out += ["", table(rows, [("type", "TYPE"), ("count", "RESOURCES"), ("version", "VERSION"),
                                 ("last", "LAST"), ("nonce", "NONCE"), ("reason", "REASON")])]
        for short, t in d["types"].items():
            if t["resources"]:
                out += ["", f"{short}:"] + [f"  {r['name']}  (version {r['version']})"
                                             for r in t["resources"]]
        return "\n".join(out)

    _emit(args, _admin(args, "/config_dump"), render)
    return 0


def cmd_control_plane(args: argparse.Namespace) -> int:
    from controlplane.service import run

    return run(args)


def cmd_check_config(args: argparse.Namespace) -> int:
    from controlplane.yaml_source import YamlDirectorySource

    src = YamlDirectorySource(args.config_dir)
    src.poll()
    reg = src.registry
    for p in src.problems:
        print(f"error: {p}", file=sys.stderr)
    print(f"{args.config_dir}: {len(reg.namespaces)} namespaces, {len(reg.pods)} pods, "
          f"{len(reg.services)} services, {len(reg.endpoint_sets)} endpoint sets, "
          f"{len(src.problems)} problems")
    return 1 if src.problems else 0


def cmd_uninstall(args: argparse.Namespace) -> int:
    from agent.bpf_loader import uninstall
    from agent.instance import Instance

    if os.geteuid() != 0:
        raise UserError("nodemesh uninstall must run as root")
    done = uninstall(Instance(args.instance))
    for line in done or [f"nothing to remove for instance {args.instance!r}"]:
        print(line)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from nodemesh.demo import run_demo

    return run_demo(connections=args.connections)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "agent": run_agent, "status": cmd_status, "workloads": cmd_workloads,
    "connections": cmd_connections, "config": cmd_config, "control-plane": cmd_control_plane,
    "check-config": cmd_check_config,
    "uninstall": cmd_uninstall, "demo": cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"nodemesh {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
