"""Where one agent instance keeps its state on the node.

The instance name lets several agents (a test run, the demo, production) live
side by side: each gets its own pin folder and admin socket.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from nodemesh.errors import UserError

PIN_ROOT = Path("/sys/fs/bpf/nodemesh")
RUN_ROOT = Path("/run/nodemesh")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


@dataclass(frozen=True)
class Instance:
    name: str

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise UserError(
                f"instance name {self.name!r} is not valid: use lowercase letters, digits, "
                "'-', '_' or '.', at most 63 characters"
            )

    @property
    def pin_dir(self) -> Path:
        return PIN_ROOT / self.name

    @property
    def run_dir(self) -> Path:
        return RUN_ROOT / self.name

    @property
    def admin_socket(self) -> Path:
        return self.run_dir / "admin.sock"

    @property
    def state_file(self) -> Path:
        """What `nodemesh uninstall` needs after a crash: the cgroup we attached to."""
        return self.run_dir / "attach.json"
