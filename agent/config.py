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
    poll_interval: float = 0.25
    connect_timeout: float = 1.0
