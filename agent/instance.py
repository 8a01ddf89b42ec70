"""Where one agent instance keeps its state on the node.

The instance name lets several agents (a test run, the demo, production) live
side by side: each gets its own pin folder and admin socket.
"""

from __future__ import annotations

import fcntl
import os
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

    @property
    def lock_file(self) -> Path:
        return self.run_dir / "agent.lock"

    def lock(self) -> int:
        """Hold the instance for this process (released when it exits, even by
        SIGKILL). A second agent with the same name is refused here, before it
        can touch the first one's pins or socket."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(f"another agent with instance name {self.name!r} is running "
                            f"(pid {holder}): stop it or pick another --instance") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        return fd
