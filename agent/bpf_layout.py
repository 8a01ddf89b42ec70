"""The one Python mirror of bpf/nodemesh.h: map key/value structs, counters
and constants. Keep it in step with the header; a test compares the sizes."""

from __future__ import annotations

import ctypes
import enum
import socket
from functools import lru_cache

LOOPBACK_IP = "127.0.0.1"
OUTBOUND_PORT = 15001
PROXY_MARK = 0x539


# Cached: the proxy converts the same few pod, loopback and VIP addresses for
# every connection it accepts.
@lru_cache(maxsize=4096)
def ip_to_u32(ip: str) -> int:
    """An IPv4 address as the u32 BPF stores it (network order in memory)."""
    return int.from_bytes(socket.inet_aton(ip), "little")


@lru_cache(maxsize=4096)
def u32_to_ip(value: int) -> str:
    return socket.inet_ntoa(value.to_bytes(4, "little"))


class SvcKey(ctypes.Structure):
    _fields_ = [("ip", ctypes.c_uint32), ("port", ctypes.c_uint16), ("pad", ctypes.c_uint16)]

    @classmethod
    def of(cls, ip: str, port: int) -> SvcKey:
        return cls(ip_to_u32(ip), port, 0)


class SvcVal(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint32)]


class OrigDst(ctypes.Structure):
    _fields_ = [("ip", ctypes.c_uint32), ("port", ctypes.c_uint16), ("pad", ctypes.c_uint16)]

    def address(self) -> tuple[str, int]:
        return u32_to_ip(self.ip), self.port


class FlowKey(ctypes.Structure):
    _fields_ = [
        ("netns_cookie", ctypes.c_uint64),
        ("src_ip", ctypes.c_uint32),
        ("dst_ip", ctypes.c_uint32),
        ("src_port", ctypes.c_uint16),
        ("dst_port", ctypes.c_uint16),
        ("pad", ctypes.c_uint32),
    ]

    @classmethod
    def of(cls, netns_cookie: int, src: tuple[str, int], dst: tuple[str, int]) -> FlowKey:
        return cls(netns_cookie, ip_to_u32(src[0]), ip_to_u32(dst[0]), src[1], dst[1], 0)


class PeerVal(ctypes.Structure):
    """nm_peer's value (the sockmap engine): the peer socket's cookie, the bytes
    redirected to it, and whether this direction fell back to user space."""

    _fields_ = [("peer", ctypes.c_uint64), ("bytes", ctypes.c_uint64),
                ("passthru", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class Counter(enum.IntEnum):
    """Indexes of nm_counters, named as `nodemesh status` shows them."""

    connect4_redirected = 0
    connect4_pass_not_enrolled = 1
    connect4_pass_not_service = 2
    connect4_pass_proxy = 3
    connect4_pass_other = 4
    sockops_recorded = 5
    sockops_record_failed = 6


COUNTER_PROGRAM = {
    Counter.connect4_redirected: "connect4",
    Counter.connect4_pass_not_enrolled: "connect4",
    Counter.connect4_pass_not_service: "connect4",
    Counter.connect4_pass_proxy: "connect4",
    Counter.connect4_pass_other: "connect4",
    Counter.sockops_recorded: "sockops",
    Counter.sockops_record_failed: "sockops",
}
