"""Building and tearing down a virtual node.

Safety (PLATFORM.md): everything lives in netns and a cgroup subtree this run
creates and names with its run id; the host netns gets no route to the
sandbox and pods get no default route, so only the pod subnet is reachable
from a pod and service VIPs (198.19.0.0/16) are routed nowhere. Teardown runs
on every exit path; ``sweep`` removes what crashed runs left, recognised by
prefix and by a marker whose owner pid is dead. Only processes this run
started are ended, by pid (or, for a crashed run, by its own cgroup).
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyroute2 import NetNS, netns

from agent.cgroupfs import cgroup2_mount

NETNS_PREFIX = "nmsb-"
CGROUP_PREFIX = "nodemesh-sandbox-"
MARKER_DIR = Path("/run/nodemesh-sandbox")
NETNS_DIR = Path("/var/run/netns")
WORKDIR_PREFIX = "nodemesh-sb-"
STATE_ROOT = Path("/var/lib/nodemesh")  # the agent's persisted xDS config
POD_NET = ipaddress.IPv4Network("198.18.0.0/24")  # RFC 2544 benchmarking range
VIP_NET = ipaddress.IPv4Network("198.19.0.0/16")  # routed nowhere, by construction
BRIDGE = "br0"
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


def _enter(netns_path: str, cgroup_dir: Path) -> Any:
    """A preexec_fn: join the pod's cgroup and netns before exec."""
    procs = str(cgroup_dir / "cgroup.procs")

    def enter() -> None:
        with open(procs, "w") as f:
            f.write("0")
        fd = os.open(netns_path, os.O_RDONLY)
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            os._exit(121)
        os.close(fd)

    return enter


@dataclass
class Place:
    """A netns + cgroup pair that processes can be started in."""

    sandbox: Sandbox
    netns_name: str
    cgroup: Path

    @property
    def netns_path(self) -> str:
        return str(NETNS_DIR / self.netns_name)

    def spawn(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(list(argv), preexec_fn=_enter(self.netns_path, self.cgroup), **kw)
        self.sandbox.processes.append(proc)
        return proc

    def run(self, argv: Sequence[str], timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[str]:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        proc = subprocess.run(list(argv), preexec_fn=_enter(self.netns_path, self.cgroup),
                              timeout=timeout, check=False, **kw)
        return proc


@dataclass
class Pod(Place):
    name: str = ""
    namespace: str = ""
    ip: str = ""
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


class Sandbox:
    """A virtual node. Use as a context manager, or call ``teardown()``."""

    def __init__(self, run_id: str | None = None) -> None:
        self.run_id = run_id or secrets.token_hex(3)
        self.prefix = f"{NETNS_PREFIX}{self.run_id}"
        self.cgroup_root = cgroup2_mount() / f"{CGROUP_PREFIX}{self.run_id}"
        self.pods_cgroup = self.cgroup_root / "pods"  # the agent's attach point
        self.workdir = _workdir(self.run_id)  # manifests, logs: removed with the run
        self.processes: list[subprocess.Popen[Any]] = []
        self.pods: dict[str, Pod] = {}
        self.node: Place | None = None
        self._netns: list[str] = []
        self._next_ip = 10
        self._torn_down = False
        self._owner_pid = os.getpid()

    # -- life cycle -----------------------------------------------------------
    def __enter__(self) -> Sandbox:
        try:
            self.create()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    @property
    def marker(self) -> Path:
        return MARKER_DIR / f"{self.run_id}.json"

    def create(self) -> None:
        sweep()
        MARKER_DIR.mkdir(parents=True, exist_ok=True)
        self.marker.write_text(json.dumps({"pid": os.getpid(), "started": time.time()}))
        self.pods_cgroup.mkdir(parents=True)
        (self.cgroup_root / "node").mkdir()
        self.workdir.mkdir(mode=0o700)
        name = f"{self.prefix}-node"
        self._add_netns(name)
        with NetNS(name) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
            ns.link("add", ifname=BRIDGE, kind="bridge")
            idx = ns.link_lookup(ifname=BRIDGE)[0]
            ns.addr("add", index=idx, address=str(POD_NET[1]), prefixlen=POD_NET.prefixlen)
            ns.link("set", index=idx, state="up")
        self.node = Place(self, name, self.cgroup_root / "node")

    def _add_netns(self, name: str) -> None:
        netns.create(name)
        self._netns.append(name)

    def add_pod(self, name: str, namespace: str = "default",
                labels: dict[str, str] | None = None) -> Pod:
        """A pod: netns + veth on the node bridge + IP + cgroup under pods/."""
        assert self.node is not None, "create() the sandbox first"
        idx = len(self.pods)
        ip = str(POD_NET[self._next_ip])
        self._next_ip += 1
        ns_name = f"{self.prefix}-p{idx}"
        host_if = f"nm{self.run_id}{idx}"[:15]
        self._add_netns(ns_name)
        with NetNS(self.node.netns_name) as node:
            node.link("add", ifname=host_if, kind="veth", peer="eth0")
            peer = node.link_lookup(ifname="eth0")[0]
            node.link("set", index=peer, net_ns_fd=ns_name)
            hidx = node.link_lookup(ifname=host_if)[0]
            node.link("set", index=hidx, master=node.link_lookup(ifname=BRIDGE)[0])
            node.link("set", index=hidx, state="up")
        with NetNS(ns_name) as pod:
            pod.link("set", index=pod.link_lookup(ifname="lo")[0], state="up")
            eth = pod.link_lookup(ifname="eth0")[0]
            pod.addr("add", index=eth, address=ip, prefixlen=POD_NET.prefixlen)
            pod.link("set", index=eth, state="up")
            # No default route: only the pod subnet is reachable.
        cg = self.pods_cgroup / f"{namespace}-{name}"
        cg.mkdir()
        p = Pod(self, ns_name, cg, name=name, namespace=namespace, ip=ip, labels=dict(labels or {}))
        self.pods[p.key] = p
        return p

    def teardown(self) -> None:
        # A forked child (pyroute2 forks to create a netns) that unwinds through
        # a ``with Sandbox()`` must not tear down its parent's run.
        if self._torn_down or os.getpid() != self._owner_pid:
            return
        self._torn_down = True
        stop_processes(self.processes)
        _kill_cgroup(self.cgroup_root)
        for name in reversed(self._netns):
            with contextlib.suppress(Exception):
                netns.remove(name)
        _remove_cgroup_tree(self.cgroup_root)
        _remove_agent_leftovers(self.run_id)
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.marker.unlink(missing_ok=True)

    def agent_instance(self, suffix: str = "") -> str:
        """The agent instance name of this run: ``sb-<run id>``, or ``sb-<run id>-<suffix>`` for
        a further agent beside it (the benchmark runs one per L4 engine). Teardown, ``sweep``
        and ``leftovers`` recognise both by the run id."""
        return f"sb-{self.run_id}-{suffix}" if suffix else f"sb-{self.run_id}"


def stop_processes(procs: Sequence[subprocess.Popen[Any]], grace: float = 5.0) -> None:
    """SIGTERM, wait up to ``grace``, then SIGKILL: only these processes, by pid."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in live:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait(5)


def _kill_cgroup(root: Path) -> None:
    """End every process left in the run's own cgroup subtree (cgroup.kill, 5.14+)."""
    kill = root / "cgroup.kill"
    if kill.exists():
        with contextlib.suppress(OSError):
            kill.write_text("1")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _cgroup_has_procs(root):
            time.sleep(0.02)


def _cgroup_has_procs(root: Path) -> bool:
    for d, _, _ in os.walk(root):
        with contextlib.suppress(OSError):
            if Path(d, "cgroup.procs").read_text().strip():
                return True
    return False


def _remove_cgroup_tree(root: Path) -> None:
    if not root.exists():
        return
    for d, _, _ in sorted(os.walk(root), key=lambda t: -len(t[0])):
        for _ in range(50):
            try:
                os.rmdir(d)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.02)  # a killed process may take a moment to leave


def _workdir(run_id: str) -> Path:
    return Path(tempfile.gettempdir()) / f"{WORKDIR_PREFIX}{run_id}"


def _run_instances(run_id: str) -> list[str]:
    """The agent instance names of a run that still hold pins, a run dir or state:
    ``sb-<run id>`` and any ``sb-<run id>-<suffix>`` (see ``Sandbox.agent_instance``)."""
    from agent.instance import PIN_ROOT, RUN_ROOT

    names = {f"sb-{run_id}"}
    for root in (PIN_ROOT, RUN_ROOT, STATE_ROOT):
        with contextlib.suppress(OSError):
            names.update(p.name for p in root.glob(f"sb-{run_id}-*"))
    return sorted(names)


def _remove_agent_leftovers(run_id: str) -> None:
    """Pins and run dirs of the agents this run started, if they died before cleaning up.
    Their programs were detached when the run's cgroup went."""
    for name in _run_instances(run_id):
        _remove_instance_leftovers(name)


def _remove_instance_leftovers(name: str) -> None:
    from agent.bpf_loader import remove_pins
    from agent.instance import Instance

    inst = Instance(name)
    with contextlib.suppress(OSError):
        remove_pins(inst)
    shutil.rmtree(STATE_ROOT / inst.name, ignore_errors=True)
    with contextlib.suppress(OSError):
        STATE_ROOT.rmdir()  # only if empty
    if inst.run_dir.exists():
        for p in inst.run_dir.iterdir():
            with contextlib.suppress(OSError):
                p.unlink()
        with contextlib.suppress(OSError):
            inst.run_dir.rmdir()
    with contextlib.suppress(OSError):
        inst.pin_dir.parent.rmdir()  # only if empty: other instances keep it
    with contextlib.suppress(OSError):
        inst.run_dir.parent.rmdir()


def _owner_pid(run_id: str) -> int | None:
    """The pid that owns a run, if that process is still alive."""
    marker = MARKER_DIR / f"{run_id}.json"
    try:
        pid = int(json.loads(marker.read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return pid


def _owner_alive(run_id: str) -> bool:
    return _owner_pid(run_id) is not None


def sweep() -> list[str]:
    """Remove leftovers of crashed runs: netns, cgroups, pins, markers."""
    runs: set[str] = set()
    for name in netns.listnetns():
        if name.startswith(NETNS_PREFIX):
            runs.add(name[len(NETNS_PREFIX):].split("-", 1)[0])
    mount = cgroup2_mount()
    for d in mount.glob(f"{CGROUP_PREFIX}*"):
        runs.add(d.name[len(CGROUP_PREFIX):])
    if MARKER_DIR.is_dir():
        for m in MARKER_DIR.glob("*.json"):
            runs.add(m.stem)
    for d in _workdir("").parent.glob(f"{WORKDIR_PREFIX}*"):
        runs.add(d.name[len(WORKDIR_PREFIX):])
    swept = []
    for run_id in sorted(runs):
        if _owner_alive(run_id):
            continue
        root = mount / f"{CGROUP_PREFIX}{run_id}"
        _kill_cgroup(root)
        for name in netns.listnetns():
            if name.startswith(f"{NETNS_PREFIX}{run_id}-"):
                with contextlib.suppress(Exception):
                    netns.remove(name)
        _remove_cgroup_tree(root)
        _remove_agent_leftovers(run_id)
        shutil.rmtree(_workdir(run_id), ignore_errors=True)
        (MARKER_DIR / f"{run_id}.json").unlink(missing_ok=True)
        swept.append(run_id)
    return swept


def _instance_run(instance: str) -> str:
    """The run id in an agent instance name ``sb-<run id>[-<suffix>]`` (run ids have no '-')."""
    return instance[3:].split("-", 1)[0]


def leftovers(include_others: bool = False) -> list[str]:
    """What sandbox runs still hold on the machine: runs whose owner is dead
    or is this process. ``include_others`` adds live runs of other processes
    (a demo or benchmark running beside the tests is not a leak)."""

    def counted(run_id: str) -> bool:
        return include_others or _owner_pid(run_id) in (None, os.getpid())

    found = [f"netns {n}" for n in netns.listnetns()
             if n.startswith(NETNS_PREFIX) and counted(n[len(NETNS_PREFIX):].split("-", 1)[0])]
    found += [f"cgroup {d}" for d in cgroup2_mount().glob(f"{CGROUP_PREFIX}*")
              if counted(d.name[len(CGROUP_PREFIX):])]
    pin_root = Path("/sys/fs/bpf/nodemesh")
    if pin_root.is_dir():
        found += [f"pins {p}" for p in pin_root.glob("sb-*") if counted(_instance_run(p.name))]
    if MARKER_DIR.is_dir():
        found += [f"marker {m}" for m in MARKER_DIR.glob("*.json") if counted(m.stem)]
    if STATE_ROOT.is_dir():
        found += [f"state {p}" for p in STATE_ROOT.glob("sb-*") if counted(_instance_run(p.name))]
    found += [f"workdir {d}" for d in _workdir("").parent.glob(f"{WORKDIR_PREFIX}*")
              if counted(d.name[len(WORKDIR_PREFIX):])]
    return found
