"""Element operations on one BPF map through bpf(2) itself, for the hot path.

The proxy reads (and deletes) one nm_orig_dst entry per accepted connection.
Through BCC that is two libbpf calls, each with fresh ctypes objects; here it is
one syscall (BPF_MAP_LOOKUP_AND_DELETE_ELEM, Linux 5.14+ for hash maps) on an
attribute block built once, pointing at a value buffer the caller owns. Older
kernels refuse that command: then lookup + delete, as before.

One ``MapElems`` is not thread-safe (the attribute block is shared between
calls); the proxy uses it from its event-loop thread only.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform

# bpf(2)'s number differs per architecture (asm-generic's 280 for the newer ones).
SYS_BPF_BY_MACHINE = {"x86_64": 321, "aarch64": 280, "arm64": 280, "riscv64": 280,
                      "ppc64le": 361, "s390x": 351}
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_LOOKUP_AND_DELETE_ELEM = 21
# What a kernel without lookup-and-delete for this map type answers.
_UNSUPPORTED = (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, 524)  # 524: ENOTSUPP

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_syscall.argtypes = (ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint)


class _ElemAttr(ctypes.Structure):
    """union bpf_attr, as the BPF_MAP_*_ELEM commands read it."""

    _fields_ = [("map_fd", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("key", ctypes.c_uint64), ("value", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class MapElems:
    """Lookup, update, delete and take (lookup-and-delete) on the map ``map_fd`` (not owned:
    the caller keeps it open). Keys and values are ctypes objects of the map's
    key and value sizes; results are written into the value object."""

    def __init__(self, map_fd: int) -> None:
        machine = platform.machine()
        if machine not in SYS_BPF_BY_MACHINE:
            raise OSError(errno.ENOSYS, f"no bpf(2) syscall number known for {machine}: add it "
                                        "to SYS_BPF_BY_MACHINE in agent/bpf_syscall.py")
        self._sys_bpf = SYS_BPF_BY_MACHINE[machine]
        self._attr = _ElemAttr(map_fd=map_fd)
        self._attr_ptr = ctypes.addressof(self._attr)
        self._size = ctypes.sizeof(self._attr)
        self._take_in_one = True  # until the kernel says it cannot

    def take(self, key: ctypes.Structure, value: ctypes.Structure) -> bool:
        """Read ``key``'s value into ``value`` and delete the entry. False: no entry."""
        if self._take_in_one:
            err = self._call(BPF_MAP_LOOKUP_AND_DELETE_ELEM, key, value)
            if err == 0:
                return True
            if err == errno.ENOENT:
                return False
            if err not in _UNSUPPORTED:
                raise _error("lookup-and-delete", err)
            self._take_in_one = False  # this kernel or map type cannot: two calls from now on
        if not self.lookup(key, value):
            return False
        self.delete(key)  # ENOENT here means someone else took it first: ours is read
        return True

    def lookup(self, key: ctypes.Structure, value: ctypes.Structure) -> bool:
        err = self._call(BPF_MAP_LOOKUP_ELEM, key, value)
        if err == 0:
            return True
        if err == errno.ENOENT:
            return False
        raise _error("lookup", err)

    def update(self, key: ctypes.Structure, value: ctypes.Structure) -> None:
        """Insert or replace (BPF_ANY). Raises OSError: E2BIG when the map is full."""
        err = self._call(BPF_MAP_UPDATE_ELEM, key, value)
        if err != 0:
            raise _error("update", err)

    def delete(self, key: ctypes.Structure) -> bool:
        err = self._call(BPF_MAP_DELETE_ELEM, key, None)
        if err == 0:
            return True
        if err == errno.ENOENT:
            return False
        raise _error("delete", err)

    def _call(self, cmd: int, key: ctypes.Structure, value: ctypes.Structure | None) -> int:
        attr = self._attr
        attr.key = ctypes.addressof(key)
        attr.value = 0 if value is None else ctypes.addressof(value)
        if _syscall(self._sys_bpf, cmd, self._attr_ptr, self._size) == 0:
            return 0
        return ctypes.get_errno()


def _error(what: str, err: int) -> OSError:
    return OSError(err, f"bpf map {what} failed: {os.strerror(err)} (is the map fd still "
                        "open, and are key and value the map's sizes?)")
