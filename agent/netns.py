"""Entering network namespaces from the agent.

Python 3.11 has no ``os.setns``; libc's does the work. ``setns`` changes the
calling thread only, so the agent enters a pod's netns, creates or binds a
socket there, and returns at once, all on the event-loop thread with no await
in between: the socket keeps the netns it was created in.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import threading
from collections.abc import Iterator

from nodemesh.errors import UserError

CLONE_NEWNET = 0x40000000
# Not exported by Python's socket module (see PLATFORM.md).
SO_COOKIE = 57
SO_NETNS_COOKIE = 71

_libc = ctypes.CDLL(None, use_errno=True)
# Each thread's own netns, opened once per thread: opening /proc/thread-self/ns/net
# costs more than the two setns() calls around it, and the proxy enters a pod's
# netns for every upstream connection.
_home = threading.local()


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def open_netns(path: str) -> int:
    """Open a netns file (``/var/run/netns/<name>`` or ``/proc/<pid>/ns/net``)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UserError(f"pod netns {path} not found: is the pod running?") from None
    except PermissionError:
        raise UserError(f"cannot open pod netns {path}: run the agent as root") from None
    except OSError as exc:
        raise UserError(f"cannot open pod netns {path}: {exc.strerror}") from None
    # Fail here, not at setns: a regular file or /proc entry of another kind
    # must not get as far as the enrolled map.
    try:
        with entered(fd):
            pass
    except OSError:
        os.close(fd)
        raise UserError(f"{path} is not a network namespace: check the pod's "
                        "nodemesh.io/netns annotation") from None
    return fd


@contextlib.contextmanager
def entered(netns_fd: int) -> Iterator[None]:
    """Run the body inside ``netns_fd``, then return to this thread's own netns."""
    home = _home_netns()
    _setns(netns_fd)
    try:
        yield
    finally:
        _setns(home)


def _home_netns() -> int:
    """This thread's netns (the one it runs in outside ``entered``), opened once.
    It is kept for the thread's life (closed when the thread ends): a thread never
    leaves its own netns except through ``entered``, so it always names the right one."""
    home: _ThreadNetns | None = getattr(_home, "netns", None)
    if home is None:
        home = _home.netns = _ThreadNetns()
    return home.fd


class _ThreadNetns:
    def __init__(self) -> None:
        self.fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)

    def __del__(self) -> None:  # the thread ended: its thread-local values go
        os.close(self.fd)


def netns_cookie_of_socket(sock: socket.socket) -> int:
    """The kernel's cookie for the netns a socket lives in (what BPF sees)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
    return int.from_bytes(raw, "little")


def netns_cookie(netns_fd: int) -> int:
    """The cookie of a netns, read from a throwaway socket created inside it."""
    with entered(netns_fd):
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with probe:
        return netns_cookie_of_socket(probe)


def socket_in(netns_fd: int, family: int = socket.AF_INET,
              kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A new socket that lives in ``netns_fd``."""
    with entered(netns_fd):
        return socket.socket(family, kind)
