"""The ADS server's protocol rules, over real gRPC on 127.0.0.1, state of the
world and delta; plus the control plane service around it (YAML in, one-line
errors, clean exit). No root needed."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import yaml

from controlplane.service import ControlPlane, serve
from nodemesh.errors import UserError
from tests.xds_fixtures import (
    CACHE,
    CDS,
    DB,
    EDS,
    LDS,
    RDS,
    WEB,
    AdsHarness,
    DeltaClient,
    SotwClient,
    api_listener,
    cluster,
    endpoints,
    names,
    route,
    run,
    service,
    snapshot,
    vip_listener,
)

BASE = (WEB, endpoints(WEB, "198.18.0.10"), DB, endpoints(DB, "198.18.0.20"))
WEB2 = endpoints(WEB, "198.18.0.10", "198.18.0.11")  # web's endpoints after a scale-up
DB2 = endpoints(DB, "198.18.0.21")


async def _sotw_subscribed(h: AdsHarness, client: SotwClient, type_url: str,
                           wanted: list[str]) -> object:
    client.request(type_url, wanted)
    resp = await client.recv()
    client.ack(resp, wanted)
    return resp


# -- state of the world ----------------------------------------------------------------------

def test_sotw_wildcard_for_clusters_and_listeners_names_for_endpoints_and_routes() -> None:
    async def scenario() -> None:
        async with AdsHarness(snapshot(*BASE)) as h:
            c = h.sotw()
            c.request(CDS)  # legacy wildcard: an empty first request
            resp = await c.recv()
            assert names(resp) == sorted([cluster(WEB), cluster(DB)])
            assert resp.version_info == h.cache.snapshot.type_version(CDS)
            c.ack(resp)
            c.request(LDS, ["*"])
            assert names(await c.recv()) == sorted(
                [vip_listener(WEB), api_listener(WEB), vip_listener(DB)])
            c.request(EDS, [cluster(WEB)])
            assert names(await c.recv()) == [cluster(WEB)]
            c.request(RDS, [route(WEB)])
            assert names(await c.recv()) == [route(WEB)]

            # Endpoints and routes are never wildcards by an empty list.
            other = h.sotw("node-b")
            other.request(EDS)
            other.request(RDS)
            await other.silent()

            # A proxyless gRPC client names its one listener: it gets only that.
            g = h.sotw("grpc-client")
            g.request(LDS, [api_listener(WEB)])
            assert names(await g.recv()) == [api_listener(WEB)]

    run(scenario)


def test_sotw_empty_list_after_naming_resources_is_an_unsubscription() -> None:
    async def scenario() -> None:
        async with AdsHarness(snapshot(*BASE)) as h:
            c = h.sotw()
            c.request(CDS)
            first = await c.recv()
            c.ack(first, [cluster(WEB)])  # from now on it names what it wants
            resp = await c.recv()
            assert names(resp) == [cluster(WEB)]  # full state of what it covers
            c.ack(resp, [])  # clearing the list: unsubscribe everything, not a wildcard
            await c.silent()
            h.set(snapshot(service("web", "198.19.0.10", ("grpc", 80, 8080)),
                           endpoints(WEB, "198.18.0.10"), DB, endpoints(DB, "198.18.0.20")))
            await c.silent()

    run(scenario)


def test_sotw_stale_nonce_gets_no_response() -> None:
    async def scenario() -> None:
        async with AdsHarness(snapshot(*BASE)) as h:
            c = h.sotw()
            c.request(EDS, [cluster(WEB)])
            r1 = await c.recv()
            h.set(snapshot(WEB, WEB2, DB, endpoints(DB, "198.18.0.20")))
            r2 = await c.recv()
            assert r2.nonce != r1.nonce and names(r2) == [cluster(WEB)]
            # The client answers r1 late, asking for more: stale, so nothing.
            c.request(EDS, [cluster(WEB), cluster(DB)], r1.version_info, r1.nonce)
            await c.silent()
            # The same request answering the latest nonce is served: db is new.
            c.request(EDS, [cluster(WEB), cluster(DB)], r2.version_info, r2.nonce)
            r3 = await c.recv()
            assert names(r3) == [cluster(DB)]
            assert h.cache.clients["node-a"].acks[EDS] == 1  # r2's ACK; r1's was stale

    run(scenario)


def test_sotw_unsubscribed_resource_stops_being_sent() -> None:
    async def scenario() -> None:
        async with AdsHarness(snapshot(*BASE)) as h:
            c = h.sotw()
            resp = await _sotw_subscribed(h, c, EDS, [cluster(WEB), cluster(DB)])
            assert names(resp) == sorted([cluster(WEB), cluster(DB)])
            c.ack(resp, [cluster(WEB)])  # drop db
            await c.silent()
            h.set(snapshot(WEB, endpoints(WEB, "198.18.0.10"), DB, DB2))
            await c.silent()
            h.set(snapshot(WEB, WEB2, DB, DB2))
            assert names(await c.recv()) == [cluster(WEB)]

    run(scenario)


def test_sotw_unchanged_endpoints_and_routes_are_not_resent_after_an_unrelated_change() -> None:
    async def scenario() -> None:
        async with AdsHarness(snapshot(*BASE)) as h:
            c = h.sotw()
            for t, wanted in ((CDS, []), (LDS, []), (EDS, [cluster(WEB), cluster(DB)]),
                              (RDS, [route(WEB)])):
                await _sotw_subscribed(h, c, t, wanted)
            h.set(snapshot(WEB, endpoints(WEB, "198.18.0.10"), DB, DB2))
            resp = await c.recv()
            assert resp.type_url == EDS and names(resp) == [cluster(DB)]
            await c.silent()  # no clusters, listeners or routes: none of them changed

    run(scenario)


def test_sotw_nack_is_counted_and_logged_not_resent_and_a_later_good_version_is_sent(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="nodemesh.controlplane")

    async def scenario() -> None:
        async with AdsHarness(snapshot(*BASE)) as h:
            c = h.sotw("agent-1")
            c.request(CDS)
            bad = await c.recv()
            c.request(CDS, [], "", bad.nonce, error="cluster outbound|80: no endpoints port")
            await c.silent()  # the rejected version is not sent again
            # An unrelated change (endpoints only) does not resend clusters either.
            h.set(snapshot(WEB, WEB2, DB, endpoints(DB, "198.18.0.20")))
            await c.silent()
            rec = h.cache.clients["agent-1"]
            assert rec.nacks[CDS] == 1 and rec.acks[CDS] == 0
            assert rec.last_nack is not None and rec.last_nack.version == bad.version_info
            assert rec.last_nack.message == "cluster outbound|80: no endpoints port"
            # A fixed config is a new version: sent, then ACKed.
            h.set(snapshot(WEB, WEB2, DB, endpoints(DB, "198.18.0.20"), CACHE))
            good = await c.recv()
            assert good.version_info != bad.version_info
            assert cluster(CACHE) in names(good)
            c.ack(good)
            await c.silent()
            assert rec.acks[CDS] == 1 and rec.nacks[CDS] == 1
            assert rec.acked_versions[CDS] == good.version_info

    run(scenario)
    lines = [r.getMessage() for r in caplog.records if "NACK" in r.getMessage()]
    assert len(lines) == 1
    assert "agent-1" in lines[0] and "clusters" in lines[0] and "no endpoints port" in lines[0]


def test_sotw_change_spanning_types_goes_out_clusters_endpoints_listeners_routes() -> None:
    new_web = service("web2", "198.19.0.20", ("http", 80, 8080))
    async def scenario() -> None:
        async with AdsHarness(snapshot(DB, endpoints(DB, "198.18.0.20"))) as h:
            c = h.sotw()
            # Subscribed in the "wrong" order, and to names that do not exist yet.
            c.request(RDS, [route(new_web)])
            c.request(LDS)
            c.ack(await c.recv())
            c.request(EDS, [cluster(DB), cluster(new_web)])
            c.ack(await c.recv(), [cluster(DB), cluster(new_web)])
            c.request(CDS)
            c.ack(await c.recv())
            await c.silent()
            h.set(snapshot(DB, endpoints(DB, "198.18.0.20"), new_web,
                           endpoints(new_web, "198.18.0.30")))
            got = [(await c.recv()) for _ in range(4)]
            assert [r.type_url for r in got] == [CDS, EDS, LDS, RDS]
            assert names(got[1]) == [cluster(new_web)]
            assert names(got[3]) == [route(new_web)]

    run(scenario)


# -- delta ------------------------------------------------------------------------------

def test_delta_wildcard_named_subscriptions_and_missing_names() -> None:
    async def scenario() -> None:
        async with AdsHarness(snapshot(*BASE)) as h:
            c = h.delta()
            c.request(CDS, ["*"])
            resp = await c.recv()
            assert names(resp) == sorted([cluster(WEB), cluster(DB)])
            assert not resp.removed_resources
            c.ack(resp)
            c.request(EDS, [cluster(WEB), "outbound|1||ghost.shop.svc.cluster.local"])
            resp = await c.recv()
            assert names(resp) == [cluster(WEB)]
            # A subscribed name that does not exist is said so, not left to a timeout.
            assert list(resp.removed_resources) == ["outbound|1||ghost.shop.svc.cluster.local"]
            legacy = h.delta("node-b")
            legacy.request(LDS)  # legacy wildcard: nothing subscribed, nothing unsubscribed
            assert len(names(await legacy.recv())) == 3
            versions = {r.name: r.version for r in resp.resources}
            assert versions == {cluster(WEB): h.cache.snapshot.of(EDS)[cluster(WEB)].version}

    run(scenario)


def test_delta_unsubscribed_resource_stops_being_sent() -> None:
    async def scenario() -> None:
        async with AdsHarness(snapshot(*BASE)) as h:
            c = h.delta()
            c.request(EDS, [cluster(WEB), cluster(DB)])
            c.ack(await c.recv())
            c.request(EDS, unsubscribe=[cluster(DB)])
            await c.silent()  # unsubscribing alone needs no answer
            h.set(snapshot(WEB, endpoints(WEB, "198.18.0.10"), DB, DB2))
            await c.silent()
            h.set(snapshot(WEB, WEB2, DB, DB2))
            resp = await c.recv()
            assert names(resp) == [cluster(WEB)] and not resp.removed_resources

    run(scenario)


def test_delta_reconnect_with_initial_resource_versions_gets_only_what_changed() -> None:
    async def scenario() -> None:
        base = (*BASE, CACHE, endpoints(CACHE, "198.18.0.40"))
        async with AdsHarness(snapshot(*base)) as h:
            first = h.delta()
            held: dict[str, dict[str, str]] = {}
            first.request(CDS, ["*"])
            first.request(EDS, [cluster(WEB), cluster(DB), cluster(CACHE)])
            for _ in range(2):
                resp = await first.recv()
                held[resp.type_url] = {r.name: r.version for r in resp.resources}
                first.ack(resp)
            first.close()
            # While it was away: web scaled up, db was deleted, cache untouched.
            h.set(snapshot(WEB, WEB2, CACHE, endpoints(CACHE, "198.18.0.40")))
            again = h.delta()
            again.request(CDS, ["*"], initial=held[CDS])
            resp = await again.recv()
            assert names(resp) == []  # no cluster changed
            assert list(resp.removed_resources) == [cluster(DB)]
            again.ack(resp)
            again.request(EDS, [cluster(WEB), cluster(DB), cluster(CACHE)], initial=held[EDS])
            resp = await again.recv()
            assert names(resp) == [cluster(WEB)]
            assert list(resp.removed_resources) == [cluster(DB)]
            await again.silent()

    run(scenario)


def test_delta_unchanged_resource_is_not_resent_and_deletions_are_removed_resources() -> None:
    async def scenario() -> None:
        async with AdsHarness(snapshot(*BASE)) as h:
            c = h.delta()
            for t, sub in ((CDS, ["*"]), (LDS, ["*"]), (EDS, [cluster(WEB), cluster(DB)]),
                           (RDS, [route(WEB)])):
                c.request(t, sub)
                c.ack(await c.recv())
            h.set(snapshot(WEB, WEB2, DB, endpoints(DB, "198.18.0.20")))
            resp = await c.recv()
            assert (resp.type_url, names(resp)) == (EDS, [cluster(WEB)])
            await c.silent()
            h.set(snapshot(WEB, WEB2))  # db deleted
            got = [(await c.recv()) for _ in range(3)]
            assert [r.type_url for r in got] == [CDS, EDS, LDS]
            assert [list(r.removed_resources) for r in got] == [
                [cluster(DB)], [cluster(DB)], [vip_listener(DB)]]
            assert all(not r.resources for r in got)
            await c.silent()

    run(scenario)


def test_delta_stale_nonce_ack_gets_no_response_but_subscriptions_are_honoured() -> None:
    async def scenario() -> None:
        async with AdsHarness(snapshot(*BASE)) as h:
            c = h.delta()
            c.request(EDS, [cluster(WEB)])
            r1 = await c.recv()
            h.set(snapshot(WEB, WEB2, DB, endpoints(DB, "198.18.0.20")))
            r2 = await c.recv()
            c.ack(r1)  # stale: the server has sent r2 since
            await c.silent()
            assert h.cache.clients["node-a"].acks[EDS] == 0
            # The protocol: a subscription change counts even with a stale nonce.
            c.request(EDS, [cluster(DB)], nonce=r1.nonce)
            assert names(await c.recv()) == [cluster(DB)]
            c.ack(r2)  # r2 is stale too now
            await c.silent()

    run(scenario)


def test_delta_nack_is_counted_not_resent_and_a_later_good_version_is_sent() -> None:
    async def scenario() -> None:
        async with AdsHarness(snapshot(*BASE)) as h:
            c = h.delta("agent-1")
            c.request(CDS, ["*"])
            bad = await c.recv()
            c.request(CDS, nonce=bad.nonce, error="unsupported lb policy")
            await c.silent()
            h.set(snapshot(WEB, WEB2, DB, endpoints(DB, "198.18.0.20")))  # endpoints only
            await c.silent()
            rec = h.cache.clients["agent-1"]
            assert (rec.nacks[CDS], rec.acks[CDS]) == (1, 0)
            assert rec.last_nack is not None and rec.last_nack.message == "unsupported lb policy"
            # web's port becomes gRPC: a new version of its cluster, and only it.
            h.set(snapshot(service("web", "198.19.0.10", ("grpc", 80, 8080)),
                           endpoints(WEB, "198.18.0.10"), DB, endpoints(DB, "198.18.0.20")))
            good = await c.recv()
            assert names(good) == [cluster(WEB)]
            assert good.resources[0].version != {r.name: r.version for r in bad.resources}[
                cluster(WEB)]
            c.ack(good)
            await c.silent()
            assert (rec.nacks[CDS], rec.acks[CDS]) == (1, 1)

    run(scenario)


def test_delta_change_spanning_types_goes_out_clusters_endpoints_listeners_routes() -> None:
    new_web = service("web2", "198.19.0.20", ("http", 80, 8080))
    async def scenario() -> None:
        async with AdsHarness(snapshot(DB, endpoints(DB, "198.18.0.20"))) as h:
            c = h.delta()
            for t, sub in ((RDS, [route(new_web)]), (LDS, ["*"]),
                           (EDS, [cluster(DB), cluster(new_web)]), (CDS, ["*"])):
                c.request(t, sub)
                c.ack(await c.recv())
            await c.silent()
            h.set(snapshot(DB, endpoints(DB, "198.18.0.20"), new_web,
                           endpoints(new_web, "198.18.0.30")))
            got = [(await c.recv()) for _ in range(4)]
            assert [r.type_url for r in got] == [CDS, EDS, LDS, RDS]
            assert [names(r) for r in got] == [
                [cluster(new_web)], [cluster(new_web)],
                sorted([vip_listener(new_web), api_listener(new_web)]), [route(new_web)]]

    run(scenario)


def test_delta_unsubscribing_a_name_also_covered_by_the_wildcard_is_answered() -> None:
    async def scenario() -> None:
        async with AdsHarness(snapshot(*BASE)) as h:
            c = h.delta()
            c.request(CDS, ["*", cluster(WEB), "outbound|9||gone.shop.svc.cluster.local"])
            c.ack(await c.recv())
            c.request(CDS, unsubscribe=[cluster(WEB), "outbound|9||gone.shop.svc.cluster.local"])
            resp = await c.recv()
            # web is still covered by "*": resent; the other does not exist: removed.
            assert names(resp) == [cluster(WEB)]
            assert list(resp.removed_resources) == ["outbound|9||gone.shop.svc.cluster.local"]

    run(scenario)


def test_a_burst_of_changes_is_pushed_once_at_its_final_state() -> None:
    async def scenario() -> None:
        async with AdsHarness(snapshot(*BASE)) as h:
            d, s = h.delta(), h.sotw("node-b")
            d.request(EDS, [cluster(WEB), cluster(DB)])
            d.ack(await d.recv())
            s.request(EDS, [cluster(WEB), cluster(DB)])
            s.ack(await s.recv(), [cluster(WEB), cluster(DB)])
            # Within one burst: db changes and changes back, web changes twice.
            h.set(snapshot(WEB, WEB2, DB, DB2))
            h.set(snapshot(WEB, endpoints(WEB, "198.18.0.12"), DB, endpoints(DB, "198.18.0.20")))
            final = h.cache.snapshot.of(EDS)[cluster(WEB)].version
            for c in (d, s):
                resp = await c.recv()
                assert names(resp) == [cluster(WEB)]
                await c.silent()
            assert resp.version_info == h.cache.snapshot.type_version(EDS)
            h.set(snapshot(WEB, endpoints(WEB, "198.18.0.12")))  # db deleted...
            h.set(snapshot(WEB, endpoints(WEB, "198.18.0.12"), DB, endpoints(DB, "198.18.0.20")))
            await d.silent()  # ...and back as it was: nothing to tell
            await s.silent()
            assert h.cache.snapshot.of(EDS)[cluster(WEB)].version == final

    run(scenario)


# -- robustness and accounts ----------------------------------------------------------------------

def test_malformed_requests_end_only_their_own_stream(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="nodemesh.controlplane")

    async def scenario() -> None:
        async with AdsHarness(snapshot(*BASE)) as h:
            c = h.sotw()
            c.request(CDS, omit_type=True)
            err = await c.ended()
            assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT
            d = h.delta()
            d.request("")
            err = await d.ended()
            assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT

            assert h.channel is not None
            raw = h.channel.stream_stream(
                "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources")
            call = raw()
            await call.write(b"\xff\xff\xff not a protobuf")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await asyncio.wait_for(call.read(), 5)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

            ok = h.delta("node-b")  # the server is fine
            ok.request(CDS, ["*"])
            assert len(names(await ok.recv())) == 2

    run(scenario)
    logged = [r for r in caplog.records if "malformed" in r.getMessage()
              or "undecodable" in r.getMessage()]
    assert logged and all(r.exc_info is None for r in caplog.records)
    assert all("\n" not in r.getMessage() for r in caplog.records)


def test_client_disconnect_is_cleaned_up_and_accounts_are_kept_per_client() -> None:
    async def scenario() -> None:
        async with AdsHarness(snapshot(*BASE)) as h:
            a, b = h.delta("agent-a"), h.sotw("agent-b")
            a.request(CDS, ["*"])
            a.ack(await a.recv())
            b.request(CDS)
            resp = await b.recv()
            b.request(CDS, [], "", resp.nonce, error="nope")
            await b.silent(0.2)
            clients = h.cache.clients
            assert (clients["agent-a"].acks[CDS], clients["agent-a"].nack_total) == (1, 0)
            assert (clients["agent-b"].acks[CDS], h.cache.nacks("agent-b")) == (0, 1)
            assert len(clients["agent-a"].streams) == 1
            a.close()
            deadline = time.monotonic() + 5
            while clients["agent-a"].streams and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert not clients["agent-a"].streams
            assert len(clients["agent-b"].streams) == 1
            report = {r["node"]: r for r in h.cache.report()}
            assert report["agent-b"]["last_nack"]["message"] == "nope"
            assert report["agent-a"]["acks"] == {"clusters": 1}

    run(scenario)


# -- the service: YAML folder in, xDS out ----------------------------------------------------------

def _write(d: Path, name: str, docs: list[dict[str, object]]) -> None:
    tmp = d / f".{name}.tmp"
    tmp.write_text(yaml.safe_dump_all(docs))
    os.replace(tmp, d / name)


def _svc_doc(name: str, vip: str, port: int, port_name: str = "http") -> dict[str, object]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "shop"},
            "spec": {"clusterIP": vip, "ports": [{"name": port_name, "port": port,
                                                  "targetPort": 8080}]}}


def test_yaml_edits_reach_clients_and_a_bad_file_keeps_the_last_good_config(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="nodemesh.controlplane")
    _write(tmp_path, "web.yaml", [_svc_doc("web", "198.19.0.10", 80)])

    async def scenario() -> None:
        cp = ControlPlane(tmp_path, "127.0.0.1:0")
        port = await cp.start()
        stop = asyncio.Event()
        task = asyncio.create_task(cp.run(stop, poll_interval=0.05))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                from envoy.service.discovery.v3 import ads_pb2_grpc
                c = DeltaClient(ads_pb2_grpc.AggregatedDiscoveryServiceStub(ch), "node-y")
                c.request(CDS, ["*"])
                resp = await c.recv()
                assert names(resp) == [cluster(WEB)]
                c.ack(resp)
                _write(tmp_path, "db.yaml", [_svc_doc("db", "198.19.0.11", 5432, "tcp-pg")])
                resp = await c.recv()
                assert names(resp) == ["outbound|5432||db.shop.svc.cluster.local"]
                c.ack(resp)
                (tmp_path / "db.yaml").write_text("kind: Service\n  metadata: [oops\n")
                await c.silent(0.5)  # broken file: its last good content stays
                (tmp_path / "web.yaml").unlink()
                resp = await c.recv()
                assert list(resp.removed_resources) == [cluster(WEB)] and not resp.resources
                c.close()
        finally:
            stop.set()
            await task

    run(scenario)
    problems = [r.getMessage() for r in caplog.records if "db.yaml" in r.getMessage()]
    assert len(problems) == 1 and "keeping its last good content" in problems[0]


def test_serve_embedded_on_a_unix_socket_stops_cleanly_when_its_task_is_cancelled(
        tmp_path: Path) -> None:
    """How the agent runs its embedded control plane."""
    config = tmp_path / "config"
    config.mkdir()
    _write(config, "web.yaml", [_svc_doc("web", "198.19.0.10", 80)])
    sock = tmp_path / "xds.sock"

    async def scenario() -> None:
        ready = asyncio.Event()
        task = asyncio.create_task(serve(config, f"unix:{sock}", on_ready=lambda _: ready.set()))
        await asyncio.wait_for(ready.wait(), 10)
        async with grpc.aio.insecure_channel(f"unix:{sock}") as ch:
            from envoy.service.discovery.v3 import ads_pb2_grpc
            c = SotwClient(ads_pb2_grpc.AggregatedDiscoveryServiceStub(ch), "agent")
            c.request(LDS)
            assert names(await c.recv()) == sorted([vip_listener(WEB), api_listener(WEB)])
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await c.ended() is not None  # the stream was ended by the stop

    run(scenario)


def test_busy_port_and_missing_folder_are_one_line_user_errors(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]

        async def scenario() -> None:
            cp = ControlPlane(tmp_path, f"127.0.0.1:{port}")
            try:
                with pytest.raises(UserError, match="already in use"):
                    await cp.start()
            finally:
                await cp.stop()

        run(scenario)
    with pytest.raises(UserError, match="does not exist"):
        ControlPlane(tmp_path / "nope", "127.0.0.1:0")
    with pytest.raises(UserError, match="not HOST:PORT"):
        run(lambda: ControlPlane(tmp_path, "localhost").start())


def _spawn(tmp_path: Path, listen: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "controlplane.service", "--config-dir", str(tmp_path),
         "--listen", listen], stderr=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parent.parent)


def test_the_process_exits_cleanly_on_sigterm_and_reports_a_busy_port_in_one_line(
        tmp_path: Path) -> None:
    _write(tmp_path, "web.yaml", [_svc_doc("web", "198.19.0.10", 80)])
    proc = _spawn(tmp_path, "127.0.0.1:0")
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        deadline = time.monotonic() + 20
        while "serving xDS" not in line and time.monotonic() < deadline:
            assert line, "the control plane exited before serving"
            line = proc.stderr.readline()
        assert "serving xDS" in line and "1 clusters" in line
        port = int(line.split("(port ")[1].split(")")[0])
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
        assert proc.returncode == 0, err
        assert "Traceback" not in err

        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            second = _spawn(tmp_path, f"127.0.0.1:{port}")
            _, err = second.communicate(timeout=30)
        assert second.returncode == 1
        assert err.strip().splitlines() == [
            f"nodemesh control-plane: error: cannot listen on 127.0.0.1:{port}: the port is "
            "already in use (is another control plane running?)"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_a_large_config_is_read_off_the_event_loop(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The embedded control plane shares the agent's event loop with the node
    proxy: parsing and translating a big folder must leave the loop running
    (a ticker keeps ticking meanwhile) and happen in a worker thread."""
    import threading

    import controlplane.service as service

    threads: list[int] = []
    real = service.translate

    def spy(registry: object) -> object:
        threads.append(threading.get_ident())
        return real(registry)  # type: ignore[arg-type]

    monkeypatch.setattr(service, "translate", spy)

    async def scenario() -> None:
        cp = ControlPlane(tmp_path, "127.0.0.1:0")
        cp.poll()  # the empty folder: an empty snapshot
        _write(tmp_path, "many.yaml", [_svc_doc(f"s{i}", f"198.19.{i // 250}.{i % 250 + 1}", 80)
                                       for i in range(400)])
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.002)
                ticks += 1

        t = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        before = ticks
        assert await cp.refresh()
        during = ticks - before
        t.cancel()
        assert len(cp.cache.snapshot.of(CDS)) == 400
        assert during >= 3, f"the loop ticked {during} times while 400 services were read"

    run(scenario)
    assert threads and threads[-1] != threading.get_ident()
