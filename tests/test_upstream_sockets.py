"""The per-pod pool of upstream sockets (dataplane/upstream_sockets.py) and the
connect step (dataplane/connect.py), against a real pod netns of a sandbox
(root): the sockets live in the pod's netns, carry the proxy mark, are made a
batch at a time, go when the pod leaves, and leave no descriptor behind."""

from __future__ import annotations

import asyncio
import errno
import os
import resource
import socket
import time
from collections.abc import Iterator
from types import MappingProxyType

import pytest
import uvloop

from agent import netns
from agent.bpf_layout import PROXY_MARK
from agent.enrollment import Decision, Enroller
from dataplane.backend import Backend
from dataplane.connect import connect_from_pod
from dataplane.flows import FlowTable
from dataplane.outbound import OutboundProxy
from dataplane.relay import RelaySide
from dataplane.services import ServiceTable
from dataplane.upstream_sockets import UpstreamSockets, new_upstream_socket
from sandbox.node import Pod, Sandbox

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def pod() -> Iterator[Pod]:
    with Sandbox() as sb:
        yield sb.add_pod("client", "shop")


@pytest.fixture
def pod_netns(pod: Pod) -> Iterator[int]:
    fd = netns.open_netns(pod.netns_path)
    try:
        yield fd
    finally:
        os.close(fd)


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _assert_upstream_socket(sock: socket.socket, pod_cookie: int) -> None:
    assert netns.netns_cookie_of_socket(sock) == pod_cookie
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == PROXY_MARK
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    assert sock.getblocking() is False
    assert sock.type == socket.SOCK_STREAM and sock.family == socket.AF_INET


def test_pooled_sockets_live_in_the_pod_netns_and_are_marked(pod_netns: int) -> None:
    pod_cookie = netns.netns_cookie(pod_netns)
    with socket.socket() as mine:
        assert netns.netns_cookie_of_socket(mine) != pod_cookie  # the test's own netns
    pool = UpstreamSockets(pod_netns, batch=4)
    taken = [pool.take() for _ in range(6)]
    try:
        for sock in taken:
            _assert_upstream_socket(sock, pod_cookie)
        assert pool.created == 8 and len(pool) == 2  # two batches of 4, six handed out
        # The thread is back in its own netns after each batch.
        with socket.socket() as mine:
            assert netns.netns_cookie_of_socket(mine) != pod_cookie
    finally:
        for sock in taken:
            sock.close()
        pool.close()


def test_single_sockets_without_a_pool_are_the_same(pod_netns: int) -> None:
    with new_upstream_socket(pod_netns) as sock:
        _assert_upstream_socket(sock, netns.netns_cookie(pod_netns))


def test_close_releases_every_idle_socket_and_later_takes_still_work(pod_netns: int) -> None:
    pod_cookie = netns.netns_cookie(pod_netns)
    new_upstream_socket(pod_netns).close()  # this thread's own-netns fd, opened once
    before = _fds()
    pool = UpstreamSockets(pod_netns, batch=8)
    first = pool.take()
    assert _fds() == before + 8
    pool.close()
    assert len(pool) == 0 and _fds() == before + 1  # only the one handed out
    # A handler still connecting after the pod left gets a one-off socket, no new batch.
    late = pool.take()
    _assert_upstream_socket(late, pod_cookie)
    assert len(pool) == 0 and pool.created == 8
    first.close()
    late.close()
    assert _fds() == before


def test_a_batch_cut_short_by_the_descriptor_limit_is_used_then_reported(pod_netns: int) -> None:
    new_upstream_socket(pod_netns).close()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held: list[socket.socket] = []
    pool = UpstreamSockets(pod_netns, batch=8)
    resource.setrlimit(resource.RLIMIT_NOFILE, (_limit_leaving(3), hard))
    try:
        held.append(pool.take())  # only 3 could be made: one handed out, two kept
        assert pool.created == 3 and len(pool) == 2
        held += [pool.take(), pool.take()]
        with pytest.raises(OSError) as info:
            pool.take()
        assert info.value.errno == errno.EMFILE
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for sock in held:
            sock.close()
        pool.close()


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _limit_leaving(free: int) -> int:
    """The descriptor limit under which exactly ``free`` more can be opened (new
    descriptors take the lowest free numbers, holes first)."""
    used = {fd for fd in map(int, os.listdir("/proc/self/fd")) if _is_open(fd)}  # not listdir's own
    n = 0
    while free:
        if n not in used:
            free -= 1
        n += 1
    return n


def test_connect_from_pod_uses_the_pool_and_fails_cleanly(pod: Pod, pod_netns: int) -> None:
    """A refused connect (nothing listens in the pod) raises and closes the
    pooled socket; a connect to a listener in the pod's netns succeeds from it."""
    new_upstream_socket(pod_netns).close()

    async def main() -> None:
        with netns.entered(pod_netns):
            server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        pool = UpstreamSockets(pod_netns, batch=2)
        # A first connection, so that the event loop's own lazily made descriptors
        # are there before counting.
        warm, _ = await connect_from_pod(pod_netns, Backend("127.0.0.1", port), 1.0,
                                         lambda: RelaySide(lambda n: None))
        server.accept()[0].close()
        warm.close()
        await asyncio.sleep(0.05)
        before = _fds()
        with pytest.raises(ConnectionRefusedError):
            await connect_from_pod(pod_netns, Backend("127.0.0.1", 1), 1.0,
                                   lambda: RelaySide(lambda n: None), pool)
        transport, _ = await connect_from_pod(pod_netns, Backend("127.0.0.1", port), 1.0,
                                              lambda: RelaySide(lambda n: None), pool)
        peer, _ = server.accept()
        assert peer.getpeername() == transport.get_extra_info("sockname")
        sock = transport.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == PROXY_MARK
        transport.close()
        peer.close()
        server.close()
        pool.close()
        await asyncio.sleep(0.05)  # the transport closes on the next loop turns
        assert _fds() == before - 1  # the server socket was opened before counting

    uvloop.run(main())


def test_connect_times_out_and_cancels_without_leaving_a_writer(pod_netns: int) -> None:
    """198.18.0.250 has no owner on the pod subnet: the SYN is never answered."""
    new_upstream_socket(pod_netns).close()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        before = _fds()
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            await connect_from_pod(pod_netns, Backend("198.18.0.250", 80), 0.2,
                                   lambda: RelaySide(lambda n: None))
        assert 0.15 < time.monotonic() - t0 < 2
        task = loop.create_task(connect_from_pod(pod_netns, Backend("198.18.0.250", 80), 5,
                                                 lambda: RelaySide(lambda n: None)))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0)
        assert _fds() == before  # both sockets closed, no poll handle kept

    uvloop.run(main())


def test_the_pool_goes_when_the_pod_leaves(pod: Pod) -> None:
    """Enrollment gives each pod a pool and closes it on removal (its idle
    sockets would keep a deleted netns alive)."""

    class _Bpf:
        def __init__(self) -> None:
            self.cookies: set[int] = set()

        def enroll(self, cookie: int) -> None:
            self.cookies.add(cookie)

        def unenroll(self, cookie: int) -> None:
            self.cookies.discard(cookie)

    async def main() -> None:
        proxy = OutboundProxy(lambda _k: None, FlowTable(), connect_timeout=0.01)
        proxy.set_table(ServiceTable(MappingProxyType({})))
        bpf = _Bpf()
        enroller = Enroller(proxy, bpf)
        decision = Decision(pod=pod.key, namespace=pod.namespace, name=pod.name, ip=pod.ip,
                            netns_path=pod.netns_path, enroll=True, reason="test")
        await enroller.apply([decision])
        ctx = enroller.enrolled[pod.key].ctx
        netns_id = os.fstat(ctx.netns_fd).st_ino
        assert ctx.sockets is not None and ctx.sockets.netns_fd == ctx.netns_fd
        sock = ctx.sockets.take()
        assert netns.netns_cookie_of_socket(sock) == ctx.netns_cookie
        sock.close()
        assert len(ctx.sockets) > 0
        await enroller.apply([])
        assert ctx.sockets.closed and len(ctx.sockets) == 0
        assert not bpf.cookies
        await asyncio.sleep(0.1)  # the netns fd is closed after the connect grace
        assert not _is_open(ctx.netns_fd) or os.fstat(ctx.netns_fd).st_ino != netns_id

    uvloop.run(main())
