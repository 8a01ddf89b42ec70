"""From samples to results: per-peer medians, ratios against a peer measured
in the same run, the L4 engine decision, the Markdown tables, and the PNG plots."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.tools import INTEGRITY_FAILURES
from bench.topology import ENGINE_PEERS, ENGINES, L7_PEERS, PEERS


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

L7_METRICS = (
    Metric("l7_http_rps", "http-l7", "HTTP/1.1 keep-alive 1 KiB, L7 path, saturation", "req/s", "higher",
           _m("requests_per_second")),
    Metric("l7_http_p50", "http-l7", "HTTP/1.1 L7 latency p50", "µs", "lower", _m("latency_us", "p50"),
           added=True),
    Metric("l7_http_p99", "http-l7", "HTTP/1.1 L7 latency p99", "µs", "lower", _m("latency_us", "p99"),
           added=True),
    Metric("h2_rps", "h2", "HTTP/2 (h2c) 1 KiB, 4 conn × 8 streams", "req/s", "higher",
           _m("requests_per_second")),
    Metric("h2_p50", "h2", "HTTP/2 latency p50", "µs", "lower", _m("latency_us", "p50"), added=True),
    Metric("h2_p99", "h2", "HTTP/2 latency p99", "µs", "lower", _m("latency_us", "p99"), added=True),
    Metric("grpc_rps", "grpc", "gRPC unary (grpcio server), 4 conn × 8 streams", "req/s", "higher",
           _m("requests_per_second")),
    Metric("grpc_p50", "grpc", "gRPC latency p50", "µs", "lower", _m("latency_us", "p50"), added=True),
    Metric("grpc_p99", "grpc", "gRPC latency p99", "µs", "lower", _m("latency_us", "p99"), added=True),
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

L7_COST_METRICS = (
    Metric("cpu_10k_l7_http", "http-l7", "Proxy CPU per 10k HTTP/1.1 requests, L7", "CPU s", "lower",
           _m("proxy_cpu_seconds_per_10k_requests"), base="sidecar-haproxy"),
    Metric("cpu_10k_h2", "h2", "Proxy CPU per 10k HTTP/2 requests", "CPU s", "lower",
           _m("proxy_cpu_seconds_per_10k_requests"), base="sidecar-haproxy"),
    Metric("cpu_10k_grpc", "grpc", "Proxy CPU per 10k gRPC calls", "CPU s", "lower",
           _m("proxy_cpu_seconds_per_10k_requests"), base="sidecar-haproxy"),
)

ALL_METRICS = METRICS + COST_METRICS + L7_METRICS + L7_COST_METRICS
L4_SCENARIOS = ("latency", "bulk-1", "bulk-8", "connrate", "http", "http-paced")


def summarize(samples: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """metric key -> peer -> {median, min, max, n, values}."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for met in ALL_METRICS:
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


# -- the byte-exact check, and the L4 engine decision ------------------------------------

def integrity_rows(samples: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """peer -> samples passed/run and flow counts of the integrity scenario."""
    rows: dict[str, dict[str, Any]] = {}
    for s in samples:
        if s["scenario"] != "integrity" or "skipped" in str(s.get("error", "")):
            continue
        r = rows.setdefault(s["peer"], {"samples": 0, "passed": 0, "flows": 0, "ok_flows": 0,
                                        "failures": dict.fromkeys(INTEGRITY_FAILURES, 0),
                                        "not_run": 0, "mib_per_second": [], "errors": []})
        r["samples"] += 1
        r["passed"] += bool(s.get("ok"))
        m = s.get("metrics")
        if m is None:
            r["not_run"] += 1
            r["errors"].append(str(s.get("error", "?"))[:300])
            continue
        r["flows"] += m["flows"]
        r["ok_flows"] += m["ok_flows"]
        for k, n in m["failures"].items():
            r["failures"][k] = r["failures"].get(k, 0) + n
        if m.get("mib_per_second"):
            r["mib_per_second"].append(m["mib_per_second"])
        if not s.get("ok"):
            r["errors"].append(str(s.get("error", "?"))[:300])
    return rows


def _failures(kinds: dict[str, int]) -> str:
    return ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in kinds.items() if n) or "none"


DEFAULT_ENGINE = "userspace"
DECISION_MARGIN = 0.05
DECISION_RULE = (
    "Qualify: every integrity sample of the engine passed (all flows byte-exact both ways, the "
    "echo's trailer after the half-close) and none of its L4 traffic samples (latency, bulk, "
    "connrate, http, http-paced) failed (a stall is a failure). Score each qualifying engine "
    "against the userspace engine from the same run: (userspace RTT p50 / its RTT p50) x "
    "(its 1-stream Gbit/s / userspace 1-stream Gbit/s) x (its new connections/s / userspace "
    "new connections/s), i.e. latency gain times throughput gain, where throughput counts bytes "
    "of long flows and the setting up of short ones (medians over rounds). The highest score "
    f"wins, but an engine other than the default (userspace) must beat the default's score by "
    f"more than {DECISION_MARGIN:.0%} (one run's noise), else the default stays.")


def decide(results: dict[str, Any]) -> dict[str, Any]:
    """The L4 engine decision of issue 5, from this run's data only."""
    samples = results["samples"]
    summary = results["summary"]
    integ = integrity_rows(samples)
    engines_info = results.get("engines", {})
    rows: dict[str, dict[str, Any]] = {}
    for e in ENGINES:
        peer = ENGINE_PEERS[e]
        info = engines_info.get(e, {})
        row: dict[str, Any] = {"peer": peer}
        mine = [s for s in samples if s["peer"] == peer]
        if not mine:
            row["status"] = "no data"
            row["why"] = info.get("left_out") or "no sample of this engine in this run"
            rows[e] = row
            continue
        ir = integ.get(peer)
        row["integrity"] = ({k: ir[k] for k in ("samples", "passed", "flows", "ok_flows", "failures")}
                            if ir else None)
        failed = [f"{s['scenario']}/r{s['round']}: {' '.join(str(s.get('error', '?')).split())[:160]}"
                  for s in mine if s["scenario"] in L4_SCENARIOS and not s.get("ok")
                  and "skipped" not in str(s.get("error", ""))]
        row["failed_l4_samples"] = failed
        p50 = summary.get("rtt_p50", {}).get("peers", {}).get(peer)
        bulk = summary.get("bulk_1", {}).get("peers", {}).get(peer)
        conns = summary.get("connrate", {}).get("peers", {}).get(peer)
        row["rtt_p50_us"] = p50["median"] if p50 else None
        row["bulk_1_gbit"] = bulk["median"] if bulk else None
        row["conn_per_s"] = conns["median"] if conns else None
        row["rounds"] = max(p50["n"] if p50 else 0, bulk["n"] if bulk else 0)
        why = []
        if ir is None:
            why.append("no integrity sample")
        elif ir["passed"] != ir["samples"]:
            why.append(f"integrity: {ir['samples'] - ir['passed']}/{ir['samples']} samples failed "
                       f"({ir['flows'] - ir['ok_flows']} bad flows of {ir['flows']}: "
                       f"{_failures(ir['failures'])})")
        if failed:
            why.append(f"{len(failed)} failed L4 traffic sample(s): " + "; ".join(failed[:3]))
        if row["rtt_p50_us"] is None or row["bulk_1_gbit"] is None or row["conn_per_s"] is None:
            why.append("no latency, 1-stream bulk or connection-rate number")
        row["status"] = "disqualified" if why else "qualified"
        if why:
            row["why"] = "; ".join(why)
        rows[e] = row
    qualified = [e for e in ENGINES if rows[e]["status"] == "qualified"]
    ref = DEFAULT_ENGINE if DEFAULT_ENGINE in qualified else (qualified[0] if qualified else None)
    out: dict[str, Any] = {"rule": DECISION_RULE, "margin": DECISION_MARGIN, "reference": ref,
                           "engines": rows, "mode": results.get("mode"),
                           "rounds": results.get("params", {}).get("rounds")}
    if ref is None:
        out["chosen"] = None
        any_data = any(r["status"] != "no data" for r in rows.values())
        out["why"] = ("no engine qualified in this run" if any_data
                      else "no L4 engine data in this run (the decision needs the latency, bulk and "
                           "integrity scenarios)")
        return out
    r0 = rows[ref]
    for e in qualified:
        r = rows[e]
        r["latency_gain"] = round(r0["rtt_p50_us"] / r["rtt_p50_us"], 3)
        r["throughput_gain"] = round(r["bulk_1_gbit"] / r0["bulk_1_gbit"], 3)
        r["connection_gain"] = round(r["conn_per_s"] / r0["conn_per_s"], 3)
        r["score"] = round(r["latency_gain"] * r["throughput_gain"] * r["connection_gain"], 3)
    best = max(qualified, key=lambda e: rows[e]["score"])
    both = [e for e in qualified
            if rows[e]["rtt_p50_us"] == min(rows[x]["rtt_p50_us"] for x in qualified)
            and rows[e]["bulk_1_gbit"] == max(rows[x]["bulk_1_gbit"] for x in qualified)]
    out["best_on_both"] = both[0] if both else None
    if best != ref and ref == DEFAULT_ENGINE and rows[best]["score"] <= 1 + DECISION_MARGIN:
        out["chosen"] = ref
        out["why"] = (f"{best} scored highest ({rows[best]['score']:.2f} against {ref}'s 1.00) but not by "
                      f"more than {DECISION_MARGIN:.0%}: the default stays")
    else:
        out["chosen"] = best

        def scored(e: str) -> str:
            r = rows[e]
            return (f"{e} {r['score']:.2f} (latency gain {r['latency_gain']:.2f} × throughput gain "
                    f"{r['throughput_gain']:.2f} × connection-rate gain {r['connection_gain']:.2f})")

        others = [scored(e) for e in qualified if e not in (best, ref)]
        if best == ref:
            out["why"] = (f"the highest score among the qualifying engines ({ref} = 1.00 by definition)"
                          + (f"; {', '.join(others)}" if others else "; the only qualifying engine"))
        else:
            out["why"] = f"score {scored(best)} against {ref}" + (f"; {', '.join(others)}" if others else "")
    return out


def _decision_md(d: dict[str, Any]) -> list[str]:
    lines = ["## L4 engine decision", "", f"**{d['chosen'] or 'none'}**: {d['why']}."]
    if all(r["status"] == "no data" for r in d["engines"].values()):
        return lines
    lines += ["", f"Rule: {d['rule']}", "",
              "| engine | status | integrity samples passed | bad flows | failed L4 samples "
              "| RTT p50 (µs) | 1 stream (Gbit/s) | new conn/s | latency gain | throughput gain "
              "| connection-rate gain | score |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e, r in d["engines"].items():
        if r["status"] == "no data":
            lines.append(f"| {e} | no data: {' '.join(str(r['why']).split())[:300]} | | | | | | | | | | |")
            continue
        ir = r.get("integrity")
        integ = f"{ir['passed']}/{ir['samples']}" if ir else "—"
        nbad = ir["flows"] - ir["ok_flows"] if ir else 0
        bad = "—" if not ir else f"{nbad} of {ir['flows']}"
        if nbad:
            bad += f" ({_failures(ir['failures'])})"

        def f(v: Any, fmt: str) -> str:
            return format(v, fmt) if v is not None else "—"

        lines.append(f"| {e} | {r['status']} | {integ} | {bad} | {len(r['failed_l4_samples'])} | "
                     f"{f(r.get('rtt_p50_us'), '.1f')} | {f(r.get('bulk_1_gbit'), '.2f')} | "
                     f"{f(r.get('conn_per_s'), ',.0f')} | "
                     f"{f(r.get('latency_gain'), '.2f')} | {f(r.get('throughput_gain'), '.2f')} | "
                     f"{f(r.get('connection_gain'), '.2f')} | {f(r.get('score'), '.2f')} |")
    why = [f"- {e}: {' '.join(str(r['why']).split())[:500]}" for e, r in d["engines"].items()
           if r["status"] == "disqualified"]
    if why:
        lines += ["", "Disqualified:", "", *why]
    if d.get("mode") == "quick" or (d.get("rounds") or 0) < 2:
        lines += ["", "One round: one sample per engine. A smoke check of the rule, not a decision to "
                      "quote; the full mode's medians over three rounds are."]
    return lines


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


def _present(results: dict[str, Any], among: tuple[str, ...]) -> tuple[str, ...]:
    """The peers of ``among`` that were in this run."""
    peers = results.get("peers", {})
    return tuple(p for p in among if peers.get(p, {}).get("in_run", True)
                 and any(x["peer"] == p for x in results["samples"]))


def markdown(results: dict[str, Any]) -> str:
    s = results["summary"]
    mach = results["machine"]
    p = results["params"]
    engines = results.get("engines", {})
    in_run = [f"{e} (`{i['peer']}`)" for e, i in engines.items() if i.get("in_run")]
    left = [f"{e}: {i['left_out']}" for e, i in engines.items() if i.get("left_out")]
    out = [f"# nodemesh benchmark: {results['run_name']}", "",
           f"- command: `{results['command']}` ({results['mode']} mode, {p['rounds']} round(s), "
           f"{results['duration_seconds']:.0f} s)",
           f"- machine: {mach['hostname']}, {mach['cpu_count']} CPUs ({mach['cpu_model']}), "
           f"kernel {mach['kernel']}, Python {mach['python']}",
           "- peers: " + ", ".join(f"{k} {v}" for k, v in mach["tools"].items()),
           f"- nodemesh {mach['nodemesh_commit']}; L4 engines measured: " + (", ".join(in_run) or "none")
           + (f"; left out: {'; '.join(left)}" if left else ""),
           "",
           "Each cell: the median over rounds (with [min–max] when there are several), then "
           "`(ratio×, ±difference)` against `direct` measured in the same run. One run on a "
           "noisy 2-core machine where the load tool, the proxy and the server share both cores: "
           "compare ratios, not absolute numbers across machines.", ""]
    l4 = _present(results, PEERS)
    if any(k in s for k in (m.key for m in METRICS)):
        out += ["## L4 traffic (ratio vs `direct`)", "",
                "Every service port here is declared TCP (`tcp-…`): nodemesh forwards with its L4 "
                "engine, one agent per engine.", ""]
        out += _table(METRICS, s, l4)
        out += ["", "## L4 proxy cost (ratio vs `sidecar-haproxy`; `direct` has no proxy)", "",
                "CPU seconds (user+system) of the proxy processes' own accounting during the "
                "sample: the HAProxy pid for the HAProxy peers, the agent pid for nodemesh. Kernel "
                "work done in the client's context (iptables NAT, the connect4 program) and in "
                "softirq (the sockmap engine's splice) is not in it.", ""]
        out += _table(COST_METRICS, s, tuple(x for x in l4 if x != "direct"))
    integ = integrity_rows(results["samples"])
    if integ:
        out += ["", "## Byte-exact check through each L4 engine (integrity)", "",
                f"{p['integrity_flows']} concurrent flows × {_bytes(p['integrity_bytes'])} each, "
                "to an echo server that answers `bye <n>` only after the client's EOF: every byte "
                "back (SHA-256, both directions) and the trailer after the half-close. A flow "
                f"with no progress for {p['integrity_idle_seconds']:g} s is stalled; truncated: the "
                "connection ended (EOF) before every byte came back; error: connect failed or "
                "reset.", "",
                "| peer | samples passed | flows passed | stalled | error (reset) | truncated "
                "| wrong bytes | no trailer | MiB/s both ways (median) |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for peer in _present(results, PEERS):
            r = integ.get(peer)
            if r is None:
                continue
            rate = _num(statistics.median(r["mib_per_second"])) if r["mib_per_second"] else "—"
            f = r["failures"]
            out.append(f"| `{peer}` | {r['passed']}/{r['samples']} | {r['ok_flows']}/{r['flows']} | "
                       + " | ".join(str(f.get(k, 0)) for k in INTEGRITY_FAILURES) + f" | {rate} |")
    if results.get("l4_engine_decision"):
        out += [""] + _decision_md(results["l4_engine_decision"])
    if any(k in s for k in (m.key for m in L7_METRICS)):
        l7 = _present(results, L7_PEERS)
        out += ["", "## L7: HTTP/1.1, HTTP/2, gRPC (ratio vs `direct`)", "",
                "Ports named `http-…`, `http2-…`, `grpc-…`: nodemesh takes its HTTP/1.1 and HTTP/2 "
                "paths (per-request routing and balancing, telemetry; the L4 engine does not "
                "matter there, so only the userspace agent is measured); the HAProxy peers run "
                "`mode http` on these ports (HTTP/2 to the server with `proto h2`), the same work "
                "class. The h2 and gRPC latencies come from h2load's per-request log.", ""]
        out += _table(L7_METRICS, s, l7)
        checks = results.get("grpc_checks") or {}
        if checks:
            out += ["", "gRPC check before the load (a grpcio client, 5 Echo calls, through each peer): "
                    + ", ".join(f"`{k}` {v['codes']}{'' if v['replies_exact'] else ' (WRONG replies)'}"
                                for k, v in checks.items())
                    + "; under h2load every response must carry the 69-byte message (a gRPC error "
                      "has none)."]
        out += ["", "## L7 proxy cost (ratio vs `sidecar-haproxy`)", ""]
        out += _table(L7_COST_METRICS, s, tuple(x for x in l7 if x != "direct"))
    mem = results.get("memory") or {}
    if mem.get("pods"):
        out += ["", "## Memory: enrolled pods", "",
                "nodemesh: one agent (BPF loader, node proxy, admin) for the node, the userspace "
                "engine's (the other engines' agents are stopped first). Sidecar model: "
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
                "the agent's admin API lists the services (the agent parses in worker threads: its "
                "proxy keeps serving, slowed by the GIL).", "",
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


def _bytes(n: int) -> str:
    return f"{n // 2**20} MiB" if n % 2**20 == 0 else f"{n // 2**10} KiB" if n % 2**10 == 0 else f"{n} B"


# -- plots -------------------------------------------------------------------------------

PLOTS = ("latency.png", "throughput.png", "connrate.png", "http.png", "http_latency.png",
         "proxy_cpu.png", "l7.png", "l7_latency.png", "l7_proxy_cpu.png", "memory.png")

COLORS = {"direct": "#7f7f7f", "sidecar-haproxy": "#d62728", "node-haproxy-iptables": "#ff7f0e",
          "nodemesh": "#1f77b4", "nodemesh-sockmap": "#17becf", "nodemesh-splice": "#2ca02c"}


def preload_matplotlib() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401


def plots(results: dict[str, Any], outdir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["summary"]
    made: list[str] = []
    title = f"{results['run_name']} ({results['mode']})"

    l4 = _present(results, PEERS)
    l7 = _present(results, L7_PEERS)

    def bars(fname: str, groups: list[tuple[str, str]], ylabel: str, heading: str,
             peers: tuple[str, ...] = l4, log: bool = False) -> None:
        assert fname in PLOTS, fname   # main._prepare_out removes only these
        groups = [(k, lbl) for k, lbl in groups if k in s]
        if not groups:
            return
        if not peers:
            return
        fig, ax = plt.subplots(figsize=(10, 4.4))
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
        # Fixed margins and the legend outside the axes: tight_layout and loc="best" took
        # most of a second per plot on a busy 2-core machine.
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.grid(axis="y", alpha=0.3)
        fig.subplots_adjust(left=0.08, right=0.8, top=0.86, bottom=0.08)
        fig.savefig(outdir / fname, dpi=100)
        plt.close(fig)
        made.append(fname)

    bars("latency.png", [("rtt_p50", "p50"), ("rtt_p99", "p99")], "round trip (µs)",
         "sockperf TCP ping-pong, 64 B, persistent connection (lower is better)", log=True)
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
         "proxy CPU seconds", "Proxy CPU (own accounting; lower is better)",
         peers=tuple(x for x in l4 if x != "direct"))
    bars("l7.png", [("l7_http_rps", "HTTP/1.1 (wrk)"), ("h2_rps", "HTTP/2 (h2load)"),
                    ("grpc_rps", "gRPC unary (h2load)")], "requests/s",
         "L7 paths at saturation: nodemesh HTTP paths, HAProxy mode http (higher is better)",
         peers=l7, log=True)
    bars("l7_latency.png", [("l7_http_p50", "HTTP/1.1 p50"), ("l7_http_p99", "HTTP/1.1 p99"),
                            ("h2_p50", "HTTP/2 p50"), ("h2_p99", "HTTP/2 p99"),
                            ("grpc_p50", "gRPC p50"), ("grpc_p99", "gRPC p99")],
         "latency (µs)", "L7 latency at saturation (lower is better)", peers=l7, log=True)
    bars("l7_proxy_cpu.png", [("cpu_10k_l7_http", "per 10k HTTP/1.1 req"),
                              ("cpu_10k_h2", "per 10k HTTP/2 req"), ("cpu_10k_grpc", "per 10k gRPC calls")],
         "proxy CPU seconds", "L7 proxy CPU (own accounting; lower is better)",
         peers=tuple(x for x in l7 if x != "direct"))

    mem = results.get("memory") or {}
    rows = [r for r in mem.get("pods", []) if "sidecars" in r]
    if rows:
        zero = {"rss": 0, "pss": 0, "uss": 0}   # no pod, no sidecar: the lines start at 0 pods
        rows = [{**r, "sidecars": zero} for r in mem["pods"] if r.get("pods") == 0 and "agent" in r] + rows
        fig, ax = plt.subplots(figsize=(10, 4.2))
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
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.grid(alpha=0.3)
        fig.subplots_adjust(left=0.08, right=0.72, top=0.86, bottom=0.11)
        fig.savefig(outdir / "memory.png", dpi=100)
        plt.close(fig)
        made.append("memory.png")
    return made


def rerender(folder: Path) -> None:
    """Recompute the summary, the decision and results.md from a run's results.json
    (after a change to this report; the samples are not touched)."""
    path = folder / "results.json"
    results = json.loads(path.read_text())
    results["summary"] = summarize(results["samples"])
    results["l4_engine_decision"] = decide(results)
    path.write_text(json.dumps(results, indent=2) + "\n")
    (folder / "results.md").write_text(markdown(results))


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2 or not (Path(sys.argv[1]) / "results.json").is_file():
        sys.exit("usage: python -m bench.report RESULTS_DIR   (re-renders results.md and the "
                 "decision from RESULTS_DIR/results.json)")
    rerender(Path(sys.argv[1]))
    print(f"re-rendered {sys.argv[1]}/results.md")
