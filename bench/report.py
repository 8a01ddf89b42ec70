"""From samples to results: per-peer medians, ratios against a peer measured
in the same run, the Markdown table, and the PNG plots."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.topology import PEERS


@dataclass(frozen=True)
class Metric:
    key: str
    scenario: str
    label: str
    unit: str
    better: str                                  # "lower" or "higher"
    get: Callable[[dict[str, Any]], float | None]
    base: str = "direct"                         # the peer ratios are taken against
    added: bool = False                          # also show the difference to the base


def _m(*path: str) -> Callable[[dict[str, Any]], float | None]:
    def get(s: dict[str, Any]) -> float | None:
        v: Any = s.get("metrics")
        for p in path:
            if not isinstance(v, dict) or v.get(p) is None:
                return None
            v = v[p]
        return float(v)
    return get


METRICS = (
    Metric("rtt_p50", "latency", "RTT p50, 64 B ping-pong", "µs", "lower", _m("rtt_us", "p50"),
           added=True),
    Metric("rtt_p99", "latency", "RTT p99, 64 B ping-pong", "µs", "lower", _m("rtt_us", "p99"),
           added=True),
    Metric("bulk_1", "bulk-1", "Throughput, 1 stream", "Gbit/s", "higher", _m("gbit_per_second")),
    Metric("bulk_8", "bulk-8", "Throughput, 8 streams", "Gbit/s", "higher", _m("gbit_per_second")),
    Metric("connrate", "connrate", "New connections/s (HTTP/1.1 Connection: close)", "conn/s",
           "higher", _m("requests_per_second")),
    Metric("http_rps", "http", "HTTP/1.1 keep-alive 1 KiB, saturation", "req/s", "higher",
           _m("requests_per_second")),
    Metric("http_p50", "http", "HTTP latency p50 at saturation", "µs", "lower",
           _m("latency_us", "p50"), added=True),
    Metric("http_p99", "http", "HTTP latency p99 at saturation", "µs", "lower",
           _m("latency_us", "p99"), added=True),
    Metric("paced_p50", "http-paced", "HTTP latency p50, moderate paced load", "µs", "lower",
           _m("latency_us", "p50"), added=True),
    Metric("paced_p99", "http-paced", "HTTP latency p99, moderate paced load", "µs", "lower",
           _m("latency_us", "p99"), added=True),
)

COST_METRICS = (
    Metric("cpu_10k_req", "http", "Proxy CPU per 10k keep-alive requests", "CPU s", "lower",
           _m("proxy_cpu_seconds_per_10k_requests"), base="sidecar-haproxy"),
    Metric("cpu_10k_conn", "connrate", "Proxy CPU per 10k new connections", "CPU s", "lower",
           _m("proxy_cpu_seconds_per_10k_connections"), base="sidecar-haproxy"),
    Metric("cpu_gib_1", "bulk-1", "Proxy CPU per GiB, 1 stream", "CPU s", "lower",
           _m("proxy_cpu_seconds_per_gib"), base="sidecar-haproxy"),
    Metric("cpu_gib_8", "bulk-8", "Proxy CPU per GiB, 8 streams", "CPU s", "lower",
           _m("proxy_cpu_seconds_per_gib"), base="sidecar-haproxy"),
)


def summarize(samples: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """metric key -> peer -> {median, min, max, n, values}."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for met in METRICS + COST_METRICS:
        per: dict[str, dict[str, Any]] = {}
        for peer in PEERS:
            vals = [v for s in samples if s["scenario"] == met.scenario and s["peer"] == peer
                    and s.get("ok") and (v := met.get(s)) is not None]
            if vals:
                per[peer] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
                             "n": len(vals), "values": vals}
        base = per.get(met.base)
        for d in per.values():
            if base and base["median"]:
                d["ratio"] = round(d["median"] / base["median"], 3)
                if met.added:
                    d["added"] = round(d["median"] - base["median"], 1)
        if per:
            out[met.key] = {"label": met.label, "unit": met.unit, "better": met.better,
                            "ratio_base": met.base, "peers": per}
    return out


def _num(v: float) -> str:
    if v >= 1000:
        return f"{v:,.0f}"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def _cell(met: Metric, d: dict[str, Any] | None, peer: str) -> str:
    if d is None:
        return "—"
    txt = _num(d["median"])
    if d["n"] > 1:
        txt += f" <sub>[{_num(d['min'])}–{_num(d['max'])}]</sub>"
    if peer != met.base and "ratio" in d:
        txt += f" ({d['ratio']:.2f}×"
        if met.added and "added" in d:
            a = d["added"]
            txt += f", {a:+.1f}" if abs(a) < 100 else f", {a:+,.0f}"
        txt += ")"
    return txt


def _table(metrics: tuple[Metric, ...], summary: dict[str, Any], peers: tuple[str, ...]) -> list[str]:
    lines = ["| metric | " + " | ".join(f"`{p}`" for p in peers) + " |",
             "|---|" + "---:|" * len(peers)]
    for met in metrics:
        row = summary.get(met.key)
        if row is None:
            continue
        arrow = "lower is better" if met.better == "lower" else "higher is better"
        cells = [_cell(met, row["peers"].get(p), p) for p in peers]
        lines.append(f"| {met.label} ({met.unit}, {arrow}) | " + " | ".join(cells) + " |")
    return lines


def markdown(results: dict[str, Any]) -> str:
    s = results["summary"]
    mach = results["machine"]
    p = results["params"]
    out = [f"# nodemesh L4 benchmark: {results['run_name']}", "",
           f"- command: `{results['command']}` ({results['mode']} mode, {p['rounds']} round(s), "
           f"{results['duration_seconds']:.0f} s)",
           f"- machine: {mach['hostname']}, {mach['cpu_count']} CPUs ({mach['cpu_model']}), "
           f"kernel {mach['kernel']}, Python {mach['python']}",
           "- peers: " + ", ".join(f"{k} {v}" for k, v in mach["tools"].items()),
           f"- nodemesh {mach['nodemesh_commit']}; L4 engine: userspace (asyncio/uvloop relay)",
           "",
           "Each cell: the median over rounds (with [min–max] when there are several), then "
           "`(ratio×, ±difference)` against `direct` measured in the same run. One run on a "
           "noisy 2-core machine where the load tool, the proxy and the server share both cores: "
           "compare ratios, not absolute numbers across machines.", "",
           "## Traffic (ratio vs `direct`)", ""]
    out += _table(METRICS, s, PEERS)
    out += ["", "## Proxy cost (ratio vs `sidecar-haproxy`; `direct` has no proxy)", "",
            "CPU seconds (user+system) of the proxy processes' own accounting during the "
            "sample: the HAProxy pid for the HAProxy peers, the agent pid for nodemesh. Kernel "
            "work done in the client's context (iptables NAT, the connect4 program) is not "
            "in it.", ""]
    out += _table(COST_METRICS, s, PEERS[1:])
    mem = results.get("memory") or {}
    if mem.get("pods"):
        out += ["", "## Memory: enrolled pods", "",
                "nodemesh: one agent (BPF loader, node proxy, admin) for the node. Sidecar model: "
                "one HAProxy (the sidecar peer's config) per pod. RSS counts shared pages (binary, "
                "libraries) in every process: an upper bound. USS counts only a process's own "
                "pages: a lower bound. (PSS, which shares pages out, is in results.json; it moves "
                "with whatever else maps the same files.)", "",
                "| pods | agent RSS | agent USS | BPF maps (kernel) | Σ sidecar RSS | Σ sidecar USS "
                "| sidecars / agent, RSS | sidecars / agent, USS |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in mem["pods"]:
            if "error" in r:
                out.append(f"| {r['pods']} | {r['error']} | | | | | | |")
                continue
            a = r["agent"]
            bpf = _mib(r["bpf_map_bytes"]) if r.get("bpf_map_bytes") is not None else "?"
            if "sidecars" in r:
                sc = r["sidecars"]
                out.append(f"| {r['pods']} | {_mib(a['rss'])} | {_mib(a['uss'])} | {bpf} | "
                           f"{_mib(sc['rss'])} | {_mib(sc['uss'])} | {sc['rss'] / a['rss']:.2f}× | "
                           f"{sc['uss'] / a['uss']:.2f}× |")
            else:
                out.append(f"| {r['pods']} | {_mib(a['rss'])} | {_mib(a['uss'])} | {bpf} | — | — | — | — |")
        if mem.get("node_haproxy"):
            nh = mem["node_haproxy"]
            out += ["", f"`node-haproxy-iptables` runs one HAProxy for the node whatever the pod count: "
                        f"RSS {_mib(nh['rss'])}, USS {_mib(nh['uss'])}."]
    if mem.get("services"):
        npods = max((r["pods"] for r in mem.get("pods", []) if "agent" in r), default=0)
        n = max(npods, 1)
        out += ["", "## Memory: services and endpoints", "",
                f"The same agent (with the {npods} pods above still enrolled) after one manifest "
                "adds S services with E endpoints in all; beside it, ONE sidecar HAProxy carrying "
                "the same table (the classic sidecar model gives every pod the whole table), and "
                f"what {n} such sidecars add up to. Load time: from writing the manifest until "
                "the agent's admin API lists the services (the agent parses on its event loop, so "
                "its proxy waits meanwhile).", "",
                "| services / endpoints | agent load time | agent RSS | agent USS | one sidecar RSS "
                f"| one sidecar USS | {n} sidecars Σ USS | Σ sidecar USS / agent USS |",
                "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in mem["services"]:
            if "error" in r:
                out.append(f"| {r['services']} / {r['endpoints']} | {r['error']} | | | | | | |")
                continue
            a, h = r["agent"], r["sidecar_with_table"]
            total = h["uss"] * n
            out.append(f"| {r['services']} / {r['endpoints']} | {r.get('agent_load_seconds', 0):.1f} s | "
                       f"{_mib(a['rss'])} | {_mib(a['uss'])} | {_mib(h['rss'])} | {_mib(h['uss'])} | "
                       f"{_mib(total)} | {total / a['uss']:.2f}× |")
    busy = []
    for x in results["samples"]:
        mc, wall = x.get("machine_cpu"), x.get("wall_seconds")
        if mc and wall and mc["outside_sandbox_seconds"] / wall > 0.15:
            busy.append(f"{x['scenario']}/{x['peer']}/r{x['round']} "
                        f"({mc['outside_sandbox_seconds'] / wall:.0%} of a core)")
    if busy:
        out += ["", "## Noise check", "",
                "Samples during which more than 15% of a core went to work outside the run's "
                "cgroup (other jobs, or kernel threads such as ksoftirqd): " + ", ".join(busy) + "."]
    failed = [x for x in results["samples"] if not x.get("ok")]
    if failed:
        out += ["", "## Failed or skipped samples", ""]
        out += [f"- {x['scenario']}/{x['peer']}/r{x['round']}: "
                + " ".join(str(x.get("error", "?")).split())[:300] for x in failed]
    out += ["", "## Plots", ""]
    out += [f"![{p}]({p})" for p in results.get("plots", [])]
    out += ["", "Raw tool output of every sample: `raw/` (not committed). Everything in "
                "`results.json`."]
    return "\n".join(out) + "\n"


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


# -- plots -------------------------------------------------------------------------------

PLOTS = ("latency.png", "throughput.png", "connrate.png", "http.png", "http_latency.png",
         "proxy_cpu.png", "memory.png")

COLORS = {"direct": "#7f7f7f", "sidecar-haproxy": "#d62728", "node-haproxy-iptables": "#ff7f0e",
          "nodemesh": "#1f77b4"}


def plots(results: dict[str, Any], outdir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["summary"]
    made: list[str] = []
    title = f"{results['run_name']} ({results['mode']})"

    def bars(fname: str, groups: list[tuple[str, str]], ylabel: str, heading: str,
             peers: tuple[str, ...] = PEERS, log: bool = False) -> None:
        assert fname in PLOTS, fname   # main._prepare_out removes only these
        groups = [(k, lbl) for k, lbl in groups if k in s]
        if not groups:
            return
        fig, ax = plt.subplots(figsize=(8, 4.2))
        width = 0.8 / len(peers)
        for i, peer in enumerate(peers):
            xs, ys, lo, hi = [], [], [], []
            for g, (key, _) in enumerate(groups):
                d = s[key]["peers"].get(peer)
                if d is None:
                    continue
                xs.append(g + (i - (len(peers) - 1) / 2) * width)
                ys.append(d["median"])
                lo.append(d["median"] - d["min"])
                hi.append(d["max"] - d["median"])
            if not xs:
                continue
            ax.bar(xs, ys, width, label=peer, color=COLORS[peer],
                   yerr=[lo, hi] if any(lo) or any(hi) else None, capsize=3)
            for x, y, top in zip(xs, ys, hi, strict=True):   # above the error bar
                ax.annotate(_num(y), (x, y + top), ha="center", va="bottom", fontsize=7,
                            xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(range(len(groups)), [lbl for _, lbl in groups])
        if log:
            ax.set_yscale("log")
            ylabel += " (log scale)"
        ax.set_ylabel(ylabel)
        ax.set_title(f"{heading}\n{title}", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(outdir / fname, dpi=110)
        plt.close(fig)
        made.append(fname)

    bars("latency.png", [("rtt_p50", "p50"), ("rtt_p99", "p99")], "round trip (µs)",
         "sockperf TCP ping-pong, 64 B, persistent connection (lower is better)")
    bars("throughput.png", [("bulk_1", "1 stream"), ("bulk_8", "8 streams")], "Gbit/s",
         "iperf3 bulk throughput (higher is better)")
    bars("connrate.png", [("connrate", "new connections/s")], "connections/s",
         "wrk, Connection: close, 16 connections (higher is better)")
    bars("http.png", [("http_rps", "keep-alive req/s")], "requests/s",
         "wrk HTTP/1.1 keep-alive, 1 KiB, at saturation (higher is better)")
    bars("http_latency.png", [("http_p50", "p50 at saturation"), ("http_p99", "p99 at saturation"),
                              ("paced_p50", "p50 paced"), ("paced_p99", "p99 paced")],
         "latency (µs)", "wrk HTTP/1.1 latency (lower is better)", log=True)
    bars("proxy_cpu.png", [("cpu_10k_req", "per 10k keep-alive req"),
                           ("cpu_10k_conn", "per 10k new connections")],
         "proxy CPU seconds", "Proxy CPU (own accounting; lower is better)", peers=PEERS[1:])

    mem = results.get("memory") or {}
    rows = [r for r in mem.get("pods", []) if "sidecars" in r]
    if rows:
        fig, ax = plt.subplots(figsize=(8, 4.2))
        ns = [r["pods"] for r in rows]
        ax.plot(ns, [r["agent"]["rss"] / 2**20 for r in rows], "o-", color=COLORS["nodemesh"],
                label="nodemesh agent RSS")
        ax.plot(ns, [r["agent"]["uss"] / 2**20 for r in rows], "o--", color=COLORS["nodemesh"],
                alpha=0.6, label="nodemesh agent USS")
        ax.plot(ns, [r["sidecars"]["rss"] / 2**20 for r in rows], "s-",
                color=COLORS["sidecar-haproxy"], label="Σ HAProxy sidecars RSS")
        ax.plot(ns, [r["sidecars"]["uss"] / 2**20 for r in rows], "s--",
                color=COLORS["sidecar-haproxy"], alpha=0.6, label="Σ HAProxy sidecars USS")
        if mem.get("node_haproxy"):
            ax.axhline(mem["node_haproxy"]["rss"] / 2**20, color=COLORS["node-haproxy-iptables"],
                       ls=":", label="one node HAProxy RSS")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("pods on the node")
        ax.set_ylabel("MiB")
        ax.set_title(f"Memory against enrolled pods\n{title}", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(outdir / "memory.png", dpi=110)
        plt.close(fig)
        made.append("memory.png")
    return made
