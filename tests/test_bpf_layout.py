"""The ctypes mirror in agent/bpf_layout.py matches bpf/nodemesh.h as the
compiler lays it out (BCC builds its own ctypes from the compiled C)."""

from __future__ import annotations

import ctypes
import re

import pytest

from agent.bpf_layout import Counter, FlowKey, OrigDst, SvcKey, SvcVal, ip_to_u32, u32_to_ip
from agent.bpf_loader import BPF_DIR, program_text

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def bpf():  # type: ignore[no-untyped-def]
    from bcc import BPF

    b = BPF(text=program_text().encode())
    yield b
    b.cleanup()


@pytest.mark.parametrize("table,key,leaf", [
    ("nm_services", SvcKey, SvcVal),
    ("nm_pending", ctypes.c_uint64, OrigDst),
    ("nm_orig_dst", FlowKey, OrigDst),
    ("nm_enrolled", ctypes.c_uint64, ctypes.c_uint32),
])
def test_struct_sizes_match_the_compiled_c(bpf, table: str, key: type, leaf: type) -> None:  # type: ignore[no-untyped-def]
    t = bpf[table.encode()]
    assert ctypes.sizeof(t.Key) == ctypes.sizeof(key)
    assert ctypes.sizeof(t.Leaf) == ctypes.sizeof(leaf)


def test_counter_indexes_match_the_header() -> None:
    header = (BPF_DIR / "nodemesh.h").read_text()
    enum = header[header.index("enum nm_counter"):header.index("NM_COUNTER_MAX")]
    names = re.findall(r"NM_([A-Z0-9_]+)\s*(?:=\s*0)?,", enum)
    assert [n.lower() for n in names] == [c.name for c in Counter]


def test_constants_match_the_header() -> None:
    header = (BPF_DIR / "nodemesh.h").read_text()
    from agent import bpf_layout

    assert f"#define NM_OUTBOUND_PORT  {bpf_layout.OUTBOUND_PORT}" in header
    assert f"#define NM_PROXY_MARK     {hex(bpf_layout.PROXY_MARK)}" in header


def test_ip_round_trip() -> None:
    assert u32_to_ip(ip_to_u32("198.19.0.10")) == "198.19.0.10"
    # Network order in memory: the first octet is the lowest byte on x86.
    assert ip_to_u32("1.2.3.4") & 0xFF == 1
