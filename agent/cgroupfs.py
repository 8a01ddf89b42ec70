"""Finding cgroup v2 and checking an attach point. The cgroup2 mount is read
from /proc/mounts, never assumed: it is /sys/fs/cgroup on most Kubernetes
nodes and /sys/fs/cgroup/unified on hybrid hosts like ours."""

from __future__ import annotations

from pathlib import Path

from nodemesh.errors import UserError


def cgroup2_mount() -> Path:
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[2] == "cgroup2":
                return Path(parts[1])
    raise UserError("no cgroup2 filesystem is mounted: nodemesh needs cgroup v2 for its BPF hooks")


def check_cgroup_root(path: str | Path) -> Path:
    """Validate the attach point: an existing cgroup2 directory below the root."""
    mount = cgroup2_mount().resolve()
    root = Path(path).resolve()
    if root == mount:
        raise UserError(
            f"refusing to attach to the machine's root cgroup {root}: "
            "pass --cgroup-root with a subtree (e.g. the kubepods cgroup)"
        )
    if mount not in root.parents:
        raise UserError(f"cgroup root {root} is not inside the cgroup2 mount {mount}")
    if not (root / "cgroup.procs").exists():
        raise UserError(f"cgroup root {root} does not exist: create it or fix --cgroup-root")
    return root
