"""The control plane as a process: watch a folder of Kubernetes-style YAML,
translate each changed registry into a snapshot, hand it to the cache, and
serve it over ADS on gRPC. ``nodemesh control-plane`` runs this; the agent
embeds ``serve`` on a unix socket when no external control plane is given.

Run alone: ``python -m controlplane.service --config-dir DIR [--listen HOST:PORT]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc

from controlplane import naming
from controlplane.cache import SnapshotCache, fingerprint
from controlplane.server import add_to_server
from controlplane.translate import Snapshot, translate
from controlplane.yaml_source import YamlDirectorySource
from nodemesh.errors import UserError

log = logging.getLogger("nodemesh.controlplane")

DEFAULT_LISTEN = "127.0.0.1:15010"
STOP_GRACE = 1.0
# A second server on the same port must fail, not share the traffic.
SERVER_OPTIONS = (("grpc.so_reuseport", 0),
                  ("grpc.keepalive_time_ms", 30_000),
                  ("grpc.http2.min_ping_interval_without_data_ms", 10_000))


def split_host_port(listen: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); a one-line error otherwise."""
    host, sep, port = listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise UserError(f"--listen {listen!r} is not HOST:PORT (e.g. 127.0.0.1:15010) or "
                        "unix:/path/to/socket")
    return host, int(port)


def _check_free(host: str, port: int, listen: str) -> None:
    """Try the address with a plain socket first, so a busy or foreign address
    is reported in one line of ours rather than a gRPC core log and an exception."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UserError(f"cannot listen on {listen}: the port is already in use (is "
                                "another control plane running?)") from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise UserError(f"cannot listen on {listen}: {host} is not an address of this "
                                "machine") from None
            if exc.errno == errno.EACCES:
                raise UserError(f"cannot listen on {listen}: permission denied (ports below "
                                "1024 need root)") from None
            raise UserError(f"cannot listen on {listen}: {exc.strerror}") from None
        except socket.gaierror as exc:
            raise UserError(f"cannot listen on {listen}: {exc.strerror}") from None


def _summary(snapshot: Snapshot) -> str:
    return ", ".join(f"{len(snapshot.of(t))} {naming.SHORT[t]}" for t in naming.TYPE_ORDER)


def _changes(old: Snapshot, new: Snapshot) -> str:
    parts = []
    for t in naming.TYPE_ORDER:
        a, b = old.of(t), new.of(t)
        added = len(b.keys() - a.keys())
        removed = len(a.keys() - b.keys())
        changed = sum(1 for n in a.keys() & b.keys() if a[n].version != b[n].version)
        if added or removed or changed:
            parts.append(f"{naming.SHORT[t]} +{added} ~{changed} -{removed}")
    return "; ".join(parts) or "no resource changed"


class ControlPlane:
    """The YAML source, the cache and the gRPC server of one control plane."""

    def __init__(self, config_dir: str | Path, listen: str = DEFAULT_LISTEN,
                 cache: SnapshotCache | None = None) -> None:
        self.source = YamlDirectorySource(config_dir)
        self.listen = listen
        self.cache = cache or SnapshotCache()
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None
        self._reported: tuple[str, ...] = ()
        self._dir_problem: str | None = None

    def poll(self, strict: bool = False) -> bool:
        """Re-read the folder if it changed; True when a new snapshot was installed.
        A folder gone or unreadable keeps the last good snapshot, like a bad file
        (``strict``: raise ``UserError`` instead, for the first read)."""
        snapshot = self._read(strict)
        return snapshot is not None and self._install(snapshot)

    async def refresh(self) -> bool:
        """``poll()`` with the parsing and translating in a worker thread: seconds
        of Python for thousands of services, which must not stall the event loop
        (the embedded control plane shares it with the node proxy). The snapshot
        is installed on the loop, where the server reads it."""
        snapshot = await asyncio.to_thread(self._read)
        return snapshot is not None and self._install(snapshot)

    def _read(self, strict: bool = False) -> Snapshot | None:
        """The new snapshot when the folder changed, else None."""
        try:
            changed = self.source.poll()
        except UserError as exc:
            if strict:
                raise
            if str(exc) != self._dir_problem:
                log.error("config: %s (keeping the last good config)", exc)
                self._dir_problem = str(exc)
            return None
        if self._dir_problem is not None:
            log.info("config: %s is readable again", self.source.directory)
            self._dir_problem = None
        if not changed:
            return None
        problems = tuple(str(p) for p in self.source.problems)
        for p in problems:
            if p not in self._reported:
                log.error("config: %s", p)
        self._reported = problems
        return translate(self.source.registry)

    def _install(self, snapshot: Snapshot) -> bool:
        old = self.cache.snapshot
        if fingerprint(snapshot) == fingerprint(old) and self.cache.generation > 0:
            return False
        generation = self.cache.set_snapshot(snapshot)
        if generation > 1:  # the first is announced with the address it is served on
            log.info("config generation %d: %s (%s)", generation, _summary(snapshot),
                     _changes(old, snapshot))
        return True

    async def start(self) -> int:
        """Read the folder once, then bind and start serving; the bound port (0 for unix)."""
        requested = None
        if not self.listen.startswith("unix:"):
            host, requested = split_host_port(self.listen)
            _check_free(host, requested, self.listen)
        self.poll(strict=True)
        if self.cache.generation == 0:
            self.cache.set_snapshot(translate(self.source.registry))
        server = grpc.aio.server(options=SERVER_OPTIONS)
        add_to_server(server, self.cache)
        try:
            bound = server.add_insecure_port(self.listen)
        except RuntimeError:
            raise UserError(f"cannot listen on {self.listen}: the address is in use or not "
                            "available") from None
        await server.start()
        self.server, self.port = server, bound
        log.info("control plane serving xDS (ADS, sotw and delta) on %s%s from %s: %s",
                 self.listen, f" (port {bound})" if requested == 0 else "",
                 self.source.directory, _summary(self.cache.snapshot))
        return bound

    async def stop(self, grace: float = STOP_GRACE) -> None:
        if self.server is not None:
            await self.server.stop(grace)
            self.server = None

    async def run(self, stop: asyncio.Event, poll_interval: float = 0.25) -> None:
        """Serve until ``stop`` is set (or the task is cancelled), polling the folder."""
        if self.server is None:
            await self.start()
        try:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), poll_interval)
                if not stop.is_set():
                    await self.refresh()
        finally:
            await self.stop()
            log.info("control plane on %s stopped", self.listen)


async def serve(config_dir: str | Path, listen: str, poll_interval: float = 0.25, *,
                stop: asyncio.Event | None = None,
                on_ready: Callable[[ControlPlane], None] | None = None) -> None:
    """Run a control plane until ``stop`` is set or the task is cancelled.

    An unreadable folder or an address that cannot be bound raises ``UserError``
    before anything is served; later file problems are logged and keep the
    last good config."""
    cp = ControlPlane(config_dir, listen)
    try:
        await cp.start()
        if on_ready is not None:
            on_ready(cp)
        await cp.run(stop or asyncio.Event(), poll_interval)
    finally:
        await cp.stop()


# -- the command line ----------------------------------------------------------------


def build_parser_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config-dir", required=True, type=Path,
                   help="folder of Kubernetes-style YAML (Namespace, Service, EndpointSlice, "
                        "Endpoints, Pod), re-read when it changes")
    p.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                   help=f"where to serve ADS over gRPC: HOST:PORT or unix:/path "
                        f"(default {DEFAULT_LISTEN})")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT; 0 on a clean stop."""
    import uvloop

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s nodemesh %(levelname)s %(name)s: %(message)s")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(args.config_dir, args.listen, stop=stop)

    uvloop.run(main())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m controlplane.service",
                                description="nodemesh's xDS control plane (see `nodemesh "
                                "control-plane`).")
    build_parser_args(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except UserError as exc:
        print(f"nodemesh control-plane: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
