"""The BPF lifecycle: preflight checks, compile and load with BCC, attach under
the configured cgroup root (never the machine's root cgroup), pin, and the
map operations the agent and the proxy need. Detach and unpin on uninstall.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.bpf_layout import COUNTER_PROGRAM, Counter, FlowKey, OrigDst, PeerVal, SvcKey, SvcVal
from agent.bpf_syscall import MapElems
from agent.cgroupfs import check_cgroup_root
from agent.instance import Instance
from nodemesh.errors import UserError

BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"
PROGRAM_SOURCES = ("connect4.c", "connect6.c", "sockops.c")
MAPS = ("nm_enrolled", "nm_services", "nm_pending", "nm_orig_dst", "nm_counters")
# The sockmap L4 engine (experimental): its program and maps, compiled only when chosen.
L4_ENGINES = ("userspace", "sockmap")
SPLICE_SOURCES = ("sk_skb.c",)
BPF_F_ALLOW_MULTI = 2


def kernel_headers_dir() -> Path:
    """Where BCC looks for kernel headers (BCC_KERNEL_SOURCE overrides, as in BCC)."""
    override = os.environ.get("BCC_KERNEL_SOURCE")
    if override:
        return Path(override)
    return Path("/lib/modules") / os.uname().release / "build"


def preflight() -> None:
    """Fail with one clear line before BCC can fail with a page of compiler output."""
    if os.geteuid() != 0:
        raise UserError("nodemesh agent must run as root (it loads BPF programs and enters pod netns)")
    try:
        import bcc  # noqa: F401
    except ImportError:
        raise UserError(
            "BCC is not importable: install Debian's python3-bpfcc and run scripts/setup.sh "
            "(PyPI's 'bcc' is an unrelated package)"
        ) from None
    headers = kernel_headers_dir()
    if not (headers / "include").is_dir():
        raise UserError(
            f"kernel headers not found at {headers}: install linux-headers-amd64 and run "
            "scripts/setup.sh (it links them for the running kernel)"
        )
    if not _bpffs_mounted():
        raise UserError("bpffs is not mounted on /sys/fs/bpf: run scripts/setup.sh or "
                        "'mount -t bpf bpf /sys/fs/bpf'")


def _bpffs_mounted() -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1:3] == ["/sys/fs/bpf", "bpf"] for line in f if line.strip())


def program_text(sources: tuple[str, ...] = PROGRAM_SOURCES) -> str:
    # BCC rewrites map calls only in the main file, not in included headers,
    # so the header is inlined ahead of the programs instead of #included.
    header = (BPF_DIR / "nodemesh.h").read_text()
    if sources == SPLICE_SOURCES:
        # A module of its own, so that the default engine's programs are compiled
        # exactly as without it (in one text, clang folded nm_sockops's ctx reads
        # into a computed offset the verifier refuses).
        header = "#define NM_SPLICE_MODULE 1\n" + header
    bodies = [
        (BPF_DIR / name).read_text().replace('#include "nodemesh.h"', "")
        for name in sources
    ]
    return header + "\n".join(bodies)


@dataclass(frozen=True)
class Attachment:
    program: str
    attach_type: str
    cgroup: str
    pin: str


class BpfDatapath:
    """One loaded set of programs and maps for one agent instance."""

    def __init__(self, instance: Instance, cgroup_root: Path, l4_engine: str = "userspace") -> None:
        self.instance = instance
        self.cgroup_root = cgroup_root
        self.l4_engine = l4_engine
        self._splice_fd = -1  # nm_splice (SOCKHASH): BCC 0.26's Table cannot wrap it
        self._splice_bpf: Any = None
        self._bpf: Any = None
        self._lib: Any = None
        self._attached: list[tuple[Any, int, Any]] = []
        self._cgroup_fd = -1
        self._pinned = False
        self.attachments: list[Attachment] = []
        # nm_orig_dst through bpf(2) directly (one call per accepted connection),
        # and the value buffer it fills
        self._orig_dst: MapElems | None = None
        self._orig_val = OrigDst()

    # -- lifecycle -------------------------------------------------------
    def load(self) -> None:
        from bcc import BPF, BPFAttachType
        from bcc.libbcc import lib

        self._lib = lib
        try:
            self._bpf = BPF(text=program_text().encode())
            if self.l4_engine == "sockmap":
                self._splice_bpf = BPF(text=program_text(SPLICE_SOURCES).encode())
        except Exception as exc:  # BCC raises a bare Exception on compile errors
            raise UserError(f"BPF programs failed to compile: {exc} "
                            "(see the compiler output above)") from None
        try:
            connect4 = self._bpf.load_func(
                b"nm_connect4", BPF.CGROUP_SOCK_ADDR,
                attach_type=BPFAttachType.CGROUP_INET4_CONNECT)
            connect6 = self._bpf.load_func(
                b"nm_connect6", BPF.CGROUP_SOCK_ADDR,
                attach_type=BPFAttachType.CGROUP_INET6_CONNECT)
            sockops = self._bpf.load_func(b"nm_sockops", BPF.SOCK_OPS)
        except Exception as exc:  # the verifier's log is on stderr already
            raise UserError(f"the kernel refused a BPF program: {exc} (the verifier's log is "
                            "above; this kernel may lack a feature nodemesh needs)") from None
        pin_dir = self.instance.pin_dir
        if pin_dir.exists():
            raise UserError(
                f"{pin_dir} already exists: another agent with instance name "
                f"{self.instance.name!r} runs, or one crashed (run 'nodemesh uninstall "
                f"--instance {self.instance.name}')"
            )
        pin_dir.mkdir(parents=True)
        self._pinned = True
        for name in MAPS:
            self._pin(self._table(name).map_fd, pin_dir / name)
        self._orig_dst = MapElems(self._table("nm_orig_dst").map_fd)
        if self.l4_engine == "sockmap":
            self._load_splice(pin_dir)
        check_cgroup_root(self.cgroup_root)  # never the machine's root cgroup, whoever calls
        self._cgroup_fd = os.open(self.cgroup_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._write_state()
        for fn, atype, label in (
            (connect4, BPFAttachType.CGROUP_INET4_CONNECT, "connect4"),
            (connect6, BPFAttachType.CGROUP_INET6_CONNECT, "connect6"),
            (sockops, BPFAttachType.CGROUP_SOCK_OPS, "sock_ops"),
        ):
            pin = pin_dir / f"prog_{label}"
            self._pin(fn.fd, pin)
            BPF.attach_func(fn, self._cgroup_fd, atype, BPF_F_ALLOW_MULTI)
            self._attached.append((fn, self._cgroup_fd, atype))
            self.attachments.append(Attachment(fn.name.decode(), label, str(self.cgroup_root), str(pin)))

    def _load_splice(self, pin_dir: Path) -> None:
        """The stream verdict attaches to the SOCKHASH, not to a cgroup: it runs only
        for the sockets the proxy inserts, and goes away with the map."""
        from bcc import BPF, BPFAttachType

        verdict = self._splice_bpf.load_func(b"nm_splice_verdict", BPF.SK_SKB)
        self._splice_fd = self._lib.bpf_table_fd(self._splice_bpf.module, b"nm_splice")
        if self._splice_fd < 0:
            raise UserError("nm_splice (SOCKHASH) has no fd: the sockmap engine cannot load")
        self._pin(self._splice_fd, pin_dir / "nm_splice")
        self._pin(self._peer_fd(), pin_dir / "nm_peer")
        BPF.attach_func(verdict, self._splice_fd, BPFAttachType.SK_SKB_STREAM_VERDICT)
        self._attached.append((verdict, self._splice_fd, BPFAttachType.SK_SKB_STREAM_VERDICT))
        self.attachments.append(Attachment(verdict.name.decode(), "sk_skb_stream_verdict",
                                           "map nm_splice", ""))

    def close(self) -> None:
        """Detach, unpin, forget. Safe to call twice and after a failed load."""
        from bcc import BPF

        for fn, fd, atype in reversed(self._attached):
            try:
                BPF.detach_func(fn, fd, atype)
            except Exception:
                pass  # the cgroup may already be gone, which detaches too
        self._attached.clear()
        if self._cgroup_fd >= 0:
            os.close(self._cgroup_fd)
            self._cgroup_fd = -1
        if self._pinned:
            remove_pins(self.instance)
            self.instance.state_file.unlink(missing_ok=True)
            self._pinned = False
        self._orig_dst = None  # its fd goes with the BPF object below
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None
        if self._splice_bpf is not None:
            self._splice_bpf.cleanup()
            self._splice_bpf = None
            self._splice_fd = -1

    def _peer_fd(self) -> int:
        return int(self._splice_bpf[b"nm_peer"].map_fd)

    def _table(self, name: str) -> Any:
        return self._bpf[name.encode()]  # BCC wants bytes (str is deprecated)

    def _pin(self, fd: int, path: Path) -> None:
        if self._lib.bpf_obj_pin(fd, str(path).encode()) != 0:
            err = ctypes.get_errno() or errno.EIO
            raise UserError(f"cannot pin {path}: {os.strerror(err)}")

    def _write_state(self) -> None:
        self.instance.run_dir.mkdir(parents=True, exist_ok=True)
        self.instance.state_file.write_text(json.dumps({"cgroup_root": str(self.cgroup_root)}))

    # -- maps ---------------------------------------------------------------
    def enroll(self, netns_cookie: int) -> None:
        key = ctypes.c_uint64(netns_cookie)
        self._table("nm_enrolled")[key] = ctypes.c_uint32(1)

    def unenroll(self, netns_cookie: int) -> None:
        key = ctypes.c_uint64(netns_cookie)
        try:
            del self._table("nm_enrolled")[key]
        except KeyError:
            pass

    def enrolled_cookies(self) -> set[int]:
        return {k.value for k in self._table("nm_enrolled").keys()}

    def sync_services(self, wanted: dict[tuple[str, int], int]) -> None:
        """Make nm_services hold exactly ``wanted`` (VIP, port) -> id."""
        table = self._table("nm_services")
        have = {(k.ip, k.port) for k in table.keys()}
        want = {(SvcKey.of(ip, port).ip, port): sid for (ip, port), sid in wanted.items()}
        for ip_u32, port in have - set(want):
            self._lib.bpf_delete_elem(table.map_fd, ctypes.byref(SvcKey(ip_u32, port, 0)))
        failed = 0
        for (ip_u32, port), sid in want.items():
            key, val = SvcKey(ip_u32, port, 0), SvcVal(sid)
            if self._lib.bpf_update_elem(table.map_fd, ctypes.byref(key), ctypes.byref(val), 0) != 0:
                failed += 1
        if failed:
            # Most likely the map is full: those services are not redirected.
            raise UserError(f"{failed} of {len(want)} services could not be written to "
                            f"nm_services (max {table.max_entries}): they are not redirected")

    def services(self) -> set[tuple[str, int]]:
        from agent.bpf_layout import u32_to_ip

        return {(u32_to_ip(k.ip), k.port) for k in self._table("nm_services").keys()}

    def take_orig_dst(self, key: FlowKey) -> tuple[str, int] | None:
        """Look up and delete a flow's original destination (one reader: the proxy,
        on its event-loop thread)."""
        if self._orig_dst is None or not self._orig_dst.take(key, self._orig_val):
            return None
        return self._orig_val.address()

    # -- the sockmap engine's maps ------------------------------------------------
    def splice(self, first: tuple[int, int], second: tuple[int, int]) -> bool:
        """Splice two sockets, each given as (fd, cookie). Peers are written first,
        then ``first`` joins nm_splice, then ``second``: bytes ``first`` receives
        before ``second`` is in fail to redirect and turn that direction passthru
        (user space relays it, in order); ``second`` redirects from its first byte."""
        peer_fd = self._peer_fd()
        lib = self._lib
        for (_, cookie), (_, other) in ((first, second), (second, first)):
            key, val = ctypes.c_uint64(cookie), PeerVal(other, 0, 0, 0)
            if lib.bpf_update_elem(peer_fd, ctypes.byref(key), ctypes.byref(val), 0) != 0:
                self.unsplice(first[1], second[1])
                return False
        for fd, cookie in (first, second):
            key, sock = ctypes.c_uint64(cookie), ctypes.c_uint32(fd)
            rc = lib.bpf_update_elem(self._splice_fd, ctypes.byref(key), ctypes.byref(sock), 0)
            if rc != 0:
                self.unsplice(first[1], second[1])
                return False
        return True

    def unsplice(self, *cookies: int) -> None:
        peer_fd = self._peer_fd()
        for cookie in cookies:
            key = ctypes.c_uint64(cookie)
            self._lib.bpf_delete_elem(self._splice_fd, ctypes.byref(key))
            self._lib.bpf_delete_elem(peer_fd, ctypes.byref(key))

    def spliced(self, cookie: int) -> tuple[int, bool] | None:
        """(bytes redirected from this socket to its peer, passthru) or None."""
        key, val = ctypes.c_uint64(cookie), PeerVal()
        if self._lib.bpf_lookup_elem(self._peer_fd(), ctypes.byref(key),
                                     ctypes.byref(val)) != 0:
            return None
        return val.bytes, bool(val.passthru)

    def counters(self) -> dict[str, dict[str, int]]:
        table = self._table("nm_counters")
        out: dict[str, dict[str, int]] = {}
        for c in Counter:
            out.setdefault(COUNTER_PROGRAM[c], {})[c.name.split("_", 1)[1]] = int(table.sum(c).value)
        return out

    def map_sizes(self) -> list[dict[str, Any]]:
        rows = []
        for name in MAPS:
            table = self._table(name)
            entries = None if name == "nm_counters" else sum(1 for _ in table.keys())
            rows.append({"map": name, "entries": entries, "max_entries": table.max_entries,
                         "pin": str(self.instance.pin_dir / name)})
        if self.l4_engine == "sockmap":
            table = self._splice_bpf[b"nm_peer"]
            rows.append({"map": "nm_peer", "entries": sum(1 for _ in table.keys()),
                         "max_entries": table.max_entries, "pin": str(self.instance.pin_dir / "nm_peer")})
            rows.append({"map": "nm_splice", "entries": None, "max_entries": table.max_entries,
                         "pin": str(self.instance.pin_dir / "nm_splice")})
        return rows

    def kernel_view(self) -> list[dict[str, Any]]:
        """What the kernel reports attached at our cgroup (bpftool), not what we believe."""
        return kernel_attachments(self.cgroup_root)


def kernel_attachments(cgroup: Path) -> list[dict[str, Any]]:
    if not shutil.which("bpftool"):
        return []
    res = subprocess.run(["bpftool", "-j", "cgroup", "show", str(cgroup)],
                         capture_output=True, text=True, check=False)
    if res.returncode != 0 or not res.stdout.strip():
        return []
    return json.loads(res.stdout)


def remove_pins(instance: Instance) -> None:
    pin_dir = instance.pin_dir
    if pin_dir.is_dir():
        for p in pin_dir.iterdir():
            p.unlink(missing_ok=True)
        pin_dir.rmdir()


def uninstall(instance: Instance, keep_lock: bool = False) -> list[str]:
    """Remove what a crashed agent left: its attachments (by pinned program) and pins.
    Refused while an agent holds the instance (``keep_lock``: the caller is that agent)."""
    lock_fd = -1 if keep_lock else instance.lock()
    done: list[str] = []
    state = instance.state_file
    cgroup = None
    if state.exists():
        try:
            cgroup = json.loads(state.read_text()).get("cgroup_root")
        except (OSError, ValueError):
            cgroup = None
    for label in ("connect4", "connect6", "sock_ops"):
        pin = instance.pin_dir / f"prog_{label}"
        if cgroup and pin.exists() and Path(cgroup).exists():
            res = subprocess.run(["bpftool", "cgroup", "detach", cgroup, label, "pinned", str(pin)],
                                 capture_output=True, text=True, check=False)
            if res.returncode == 0:
                done.append(f"detached {label} from {cgroup}")
    if instance.pin_dir.exists():
        remove_pins(instance)
        done.append(f"removed {instance.pin_dir}")
    state.unlink(missing_ok=True)
    sock = instance.admin_socket
    if sock.exists():
        sock.unlink()
        done.append(f"removed {sock}")
    if lock_fd >= 0:
        instance.lock_file.unlink(missing_ok=True)
        os.close(lock_fd)
        try:
            instance.run_dir.rmdir()
        except OSError:
            pass
    return done
