"""agent/bpf_syscall.py against real kernel maps (root): an LRU hash shaped like
nm_orig_dst (FlowKey -> OrigDst), created here with BPF_MAP_CREATE and closed
at the end of each test."""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from collections.abc import Iterator

import pytest

from agent.bpf_layout import FlowKey, OrigDst, ip_to_u32
from agent.bpf_syscall import SYS_BPF_BY_MACHINE, MapElems

pytestmark = pytest.mark.root

BPF_MAP_CREATE = 0
BPF_MAP_TYPE_LRU_HASH = 9


class _CreateAttr(ctypes.Structure):
    _fields_ = [("map_type", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32),
                ("map_flags", ctypes.c_uint32)]


def _create_map(key_size: int, value_size: int, max_entries: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    attr = _CreateAttr(BPF_MAP_TYPE_LRU_HASH, key_size, value_size, max_entries, 0)
    fd = libc.syscall(SYS_BPF_BY_MACHINE[platform.machine()], BPF_MAP_CREATE,
                      ctypes.byref(attr), ctypes.sizeof(attr))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"BPF_MAP_CREATE: {os.strerror(err)}")
    return int(fd)


@pytest.fixture
def orig_dst_map() -> Iterator[int]:
    fd = _create_map(ctypes.sizeof(FlowKey), ctypes.sizeof(OrigDst), 64)
    try:
        yield fd
    finally:
        os.close(fd)


def _key(port: int) -> FlowKey:
    return FlowKey.of(0xC0FFEE, ("198.18.0.10", port), ("127.0.0.1", 15001))


def _dst(ip: str, port: int) -> OrigDst:
    return OrigDst(ip_to_u32(ip), port, 0)


def test_take_reads_the_value_and_deletes_the_entry(orig_dst_map: int) -> None:
    m = MapElems(orig_dst_map)
    m.update(_key(40000), _dst("198.19.0.10", 80))
    m.update(_key(40001), _dst("198.19.0.11", 7))
    val = OrigDst()
    assert m.take(_key(40001), val)
    assert val.address() == ("198.19.0.11", 7)
    assert not m.take(_key(40001), val)  # gone
    assert not m.lookup(_key(40001), val)
    assert m.lookup(_key(40000), val) and val.address() == ("198.19.0.10", 80)  # untouched


def test_missing_keys_are_false_not_errors(orig_dst_map: int) -> None:
    m = MapElems(orig_dst_map)
    assert not m.take(_key(1), OrigDst())
    assert not m.lookup(_key(1), OrigDst())
    assert not m.delete(_key(1))


def test_lookup_and_delete_fallback_gives_the_same_answers(orig_dst_map: int) -> None:
    """On a kernel without BPF_MAP_LOOKUP_AND_DELETE_ELEM for hash maps (before
    5.14) take() runs lookup + delete; forced here."""
    m = MapElems(orig_dst_map)
    m._take_in_one = False
    m.update(_key(40000), _dst("198.19.0.10", 80))
    val = OrigDst()
    assert m.take(_key(40000), val) and val.address() == ("198.19.0.10", 80)
    assert not m.take(_key(40000), val)


def test_many_takes_reuse_one_attribute_block(orig_dst_map: int) -> None:
    """The attribute block is built once and repointed per call: interleaved keys
    and values must never bleed into each other."""
    m = MapElems(orig_dst_map)
    for port in range(40000, 40050):
        m.update(_key(port), _dst("198.19.0.10", port - 39000))
    val = OrigDst()
    for port in reversed(range(40000, 40050)):
        assert m.take(_key(port), val)
        assert val.address() == ("198.19.0.10", port - 39000)


def test_a_closed_map_fd_is_an_error_that_says_what_to_check() -> None:
    fd = _create_map(ctypes.sizeof(FlowKey), ctypes.sizeof(OrigDst), 4)
    m = MapElems(fd)
    os.close(fd)
    with pytest.raises(OSError) as info:
        m.take(_key(1), OrigDst())
    assert info.value.errno == errno.EBADF
    assert "is the map fd still open" in str(info.value)
