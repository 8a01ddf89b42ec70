"""The agent's configuration: one immutable value, built from the command line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent.instance import Instance


@dataclass(frozen=True)
class AgentConfig:
    instance: Instance
    node_name: str
    config_dir: Path
    cgroup_root: Path
    # None: run our own control plane in-process on the config folder (the
    # embedded default) and take services from it over xDS like any other.
    xds_address: str | None = None
    xds_mode: str = "delta"  # delta | sotw; delta falls back to sotw by itself
    state_dir: Path | None = None  # where the last good xDS config is kept
    poll_interval: float = 0.25
    connect_timeout: float = 1.0
    sniff_window: float = 0.25  # how long an undeclared port waits for a client's first bytes
    metrics_address: str | None = "0.0.0.0:15020"  # Prometheus /metrics, Istio's port
    l4_engine: str = "userspace"  # userspace | splice (splice(2) via pipes) | sockmap (experimental)

    @property
    def config_store_path(self) -> Path:
        base = self.state_dir or Path("/var/lib/nodemesh") / self.instance.name
        return base / "xds-config.json"
