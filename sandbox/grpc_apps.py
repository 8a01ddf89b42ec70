"""gRPC programs that run inside sandbox pods: ``python -m sandbox.grpc_apps <app> ...``;
each prints JSON lines on stdout. Raw bytes in and out (no generated code).

  server   a gRPC server (service ``nodemesh.sandbox.Hello``) with these methods:
             Hello       unary: answers with its name and the peer it sees
             Echo        unary: the request bytes back, unchanged (any size)
             Fail        unary: request JSON {"code": "NOT_FOUND", "message": "..."}; fails
                         with that status, trailing metadata x-failed-by=<name> and
                         x-bin-bin=<bytes> (a -bin key), before any message: trailers-only
             Flaky       unary: UNAVAILABLE on every n-th call (request JSON {"every": n}),
                         else like Hello
             Slow        unary: request JSON {"ms": n}; answers after n ms, or notices the
                         client cancelled (counted in Stats)
             EchoStream  bidirectional streaming: every message back as it arrives
             Stats       unary: {"server", "calls" per method, "cancelled"}
  client   calls Hello N times on a target, typically
           ``xds:///<service>.<namespace>.svc.cluster.local:<port>`` with
           GRPC_XDS_BOOTSTRAP naming a bootstrap file, so grpcio's own xDS
           resolver and balancer pick the endpoint; reports who answered.
  unary    calls one method N times on one channel; reports codes, details,
           trailing metadata and replies.
  echo     one Echo call with a message of --size bytes; checks it came back byte-exact.
  stream   one EchoStream call with --messages messages of --size bytes each; checks
           every one came back byte-exact and in order.
  cancel   starts a Slow call and cancels it after --after seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc

SERVICE = "nodemesh.sandbox.Hello"
METHOD = f"/{SERVICE}/Hello"
UNLIMITED = -1
# Messages up to any size both ways: the large-message checks send several MiB.
MESSAGE_OPTIONS = (("grpc.max_send_message_length", UNLIMITED),
                   ("grpc.max_receive_message_length", UNLIMITED))


def _out(obj: object) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _json(request: bytes) -> dict[str, Any]:
    try:
        value = json.loads(request or b"{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def pattern(size: int, seed: int = 0) -> bytes:
    """Deterministic bytes that never repeat (an extendable-output hash): a slip anywhere
    changes them."""
    return hashlib.shake_256(f"nodemesh:{seed}".encode()).digest(size)


class Servicer:
    """The methods of the sandbox gRPC server; counts calls and cancellations for Stats."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lock = threading.Lock()
        self.calls: Counter[str] = Counter()
        self.cancelled = 0

    def _count(self, method: str) -> int:
        with self.lock:
            self.calls[method] += 1
            return self.calls[method]

    def hello(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._count("Hello")
        return json.dumps({"server": self.name, "peer": context.peer(),
                           "request": request.decode(errors="replace")}).encode()

    def echo(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._count("Echo")
        context.set_trailing_metadata((("x-served-by", self.name),))
        return request

    def fail(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._count("Fail")
        ask = _json(request)
        code = getattr(grpc.StatusCode, str(ask.get("code", "NOT_FOUND")), grpc.StatusCode.NOT_FOUND)
        context.set_trailing_metadata((("x-failed-by", self.name), ("x-bin-bin", b"\x00\x01\xfe\xff")))
        context.abort(code, str(ask.get("message", "no such thing")))
        return b""  # not reached: abort raises

    def flaky(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        n = self._count("Flaky")
        every = int(_json(request).get("every", 3))
        if every > 0 and n % every == 0:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"flaky: call {n} fails")
        return json.dumps({"server": self.name, "call": n}).encode()

    def slow(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._count("Slow")
        until = time.monotonic() + int(_json(request).get("ms", 1000)) / 1000
        while time.monotonic() < until:
            if not context.is_active():  # the client (or the proxy for it) cancelled
                with self.lock:
                    self.cancelled += 1
                return b""
            time.sleep(0.02)
        return json.dumps({"server": self.name, "slept": True}).encode()

    def echo_stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        self._count("EchoStream")
        yield from requests

    def stats(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        with self.lock:
            return json.dumps({"server": self.name, "calls": dict(self.calls),
                               "cancelled": self.cancelled}).encode()


def make_server(name: str, port: int, host: str = "0.0.0.0") -> tuple[grpc.Server, int, Servicer]:
    """A started server on ``host:port`` (0: any free port): (server, port, servicer)."""
    s = Servicer(name)
    unary = grpc.unary_unary_rpc_method_handler
    handler = grpc.method_handlers_generic_handler(SERVICE, {  # bytes in, bytes out
        "Hello": unary(s.hello), "Echo": unary(s.echo), "Fail": unary(s.fail),
        "Flaky": unary(s.flaky), "Slow": unary(s.slow), "Stats": unary(s.stats),
        "EchoStream": grpc.stream_stream_rpc_method_handler(s.echo_stream)})
    # Slow calls hold a worker each: enough workers that a few do not starve the rest.
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=16), handlers=(handler,),
                      options=(("grpc.so_reuseport", 0), *MESSAGE_OPTIONS))
    bound = srv.add_insecure_port(f"{host}:{port}")
    srv.start()
    return srv, bound, s


def server(args: argparse.Namespace) -> None:
    srv, port, _ = make_server(args.name, args.port)
    _out({"listening": port, "server": args.name})
    try:
        srv.wait_for_termination()
    except KeyboardInterrupt:
        pass


def _channel(target: str) -> grpc.Channel:
    # Only the pod network is reachable: no proxies.
    return grpc.insecure_channel(target, options=(("grpc.enable_http_proxy", 0), *MESSAGE_OPTIONS))


def client(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    results: list[dict[str, Any]] = []
    with grpc.insecure_channel(args.target, options=(("grpc.enable_http_proxy", 0),)) as ch:
        call = ch.unary_unary(METHOD)
        for i in range(args.calls):
            try:
                raw = call(f"call {i}".encode(), timeout=args.timeout, wait_for_ready=True)
                results.append({"ok": True, **json.loads(raw)})
            except grpc.RpcError as exc:
                results.append({"ok": False, "code": exc.code().name,
                                "details": (exc.details() or "").splitlines()[0:1]})
    ok = [r for r in results if r["ok"]]
    _out({"target": args.target, "calls": len(results), "ok": len(ok),
          "servers": sorted({r["server"] for r in ok}), "results": results,
          "seconds": round(time.monotonic() - t0, 3),
          "bootstrap": os.environ.get("GRPC_XDS_BOOTSTRAP")})
    return 0 if len(ok) == len(results) else 1


def _metadata(md: Any) -> dict[str, str]:
    """Metadata as text: -bin values hex-encoded."""
    out: dict[str, str] = {}
    for key, value in md or ():
        out[key] = value.hex() if isinstance(value, bytes) else value
    return out


def unary_calls(target: str, method: str, request: bytes, calls: int,
                timeout: float = 20.0) -> dict[str, Any]:
    """``calls`` calls of one unary method on one channel (one HTTP/2 connection)."""
    results: list[dict[str, Any]] = []
    with _channel(target) as ch:
        stub = ch.unary_unary(f"/{SERVICE}/{method}")
        for _ in range(calls):
            try:
                raw, call = stub.with_call(request, timeout=timeout, wait_for_ready=True)
                reply: Any = _json(raw) or {"size": len(raw)}
                results.append({"ok": True, "code": "OK", "reply": reply,
                                "trailers": _metadata(call.trailing_metadata())})
            except grpc.RpcError as exc:
                results.append({"ok": False, "code": exc.code().name, "details": exc.details(),
                                "initial": _metadata(exc.initial_metadata()),  # type: ignore[attr-defined]
                                "trailers": _metadata(exc.trailing_metadata())})  # type: ignore[attr-defined]
    servers = Counter(r["reply"].get("server") for r in results if r["ok"] and "server" in r["reply"])
    return {"calls": len(results), "ok": sum(r["ok"] for r in results),
            "codes": dict(Counter(r["code"] for r in results)), "servers": dict(servers),
            "results": results}


def echo_call(target: str, size: int, timeout: float = 60.0) -> dict[str, Any]:
    """One Echo of ``size`` bytes; whether it came back byte-exact."""
    sent = pattern(size, seed=size)
    t0 = time.monotonic()
    with _channel(target) as ch:
        got, call = ch.unary_unary(f"/{SERVICE}/Echo").with_call(sent, timeout=timeout,
                                                                  wait_for_ready=True)
    return {"size": size, "received": len(got), "exact": got == sent,
            "sha256": hashlib.sha256(got).hexdigest(),
            "trailers": _metadata(call.trailing_metadata()),
            "seconds": round(time.monotonic() - t0, 3)}


def stream_call(target: str, messages: int, size: int, timeout: float = 60.0) -> dict[str, Any]:
    """One EchoStream call; whether every message came back byte-exact and in order."""
    sent = [pattern(size, seed=i) for i in range(messages)]
    with _channel(target) as ch:
        replies = list(ch.stream_stream(f"/{SERVICE}/EchoStream")(
            iter(sent), timeout=timeout, wait_for_ready=True))
    return {"messages": len(replies), "bytes": sum(len(r) for r in replies),
            "exact": replies == sent}


def cancel_call(target: str, after: float, ms: int = 30_000) -> dict[str, Any]:
    """Start a Slow call of ``ms`` and cancel it after ``after`` seconds."""
    with _channel(target) as ch:
        fut = ch.unary_unary(f"/{SERVICE}/Slow").future(json.dumps({"ms": ms}).encode(),
                                                       timeout=ms / 1000 + 30, wait_for_ready=True)
        time.sleep(after)
        cancelled = fut.cancel()
        try:
            fut.result()
            code = "OK"
        except grpc.FutureCancelledError:
            code = "CANCELLED"
        except grpc.RpcError as exc:
            code = exc.code().name
    return {"cancelled": cancelled, "code": code}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sandbox.grpc_apps", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="app", required=True)
    a = sub.add_parser("server")
    a.add_argument("--port", type=int, required=True)
    a.add_argument("--name", required=True)
    a = sub.add_parser("client")
    a.add_argument("--target", required=True)
    a.add_argument("--calls", type=int, default=6)
    a.add_argument("--timeout", type=float, default=20.0,
                   help="seconds per call, including xDS resolution for the first")
    a = sub.add_parser("unary")
    a.add_argument("--target", required=True)
    a.add_argument("--method", default="Hello")
    a.add_argument("--request", default="", help="request bytes (text, e.g. JSON)")
    a.add_argument("--calls", type=int, default=1)
    a.add_argument("--timeout", type=float, default=20.0)
    a = sub.add_parser("echo")
    a.add_argument("--target", required=True)
    a.add_argument("--size", type=int, required=True)
    a = sub.add_parser("stream")
    a.add_argument("--target", required=True)
    a.add_argument("--messages", type=int, default=50)
    a.add_argument("--size", type=int, default=100_000)
    a = sub.add_parser("cancel")
    a.add_argument("--target", required=True)
    a.add_argument("--after", type=float, default=1.0)
    args = p.parse_args(argv)
    if args.app == "server":
        server(args)
        return 0
    if args.app == "client":
        return client(args)
    if args.app == "unary":
        _out(unary_calls(args.target, args.method, args.request.encode(), args.calls, args.timeout))
    elif args.app == "echo":
        _out(echo_call(args.target, args.size))
    elif args.app == "stream":
        _out(stream_call(args.target, args.messages, args.size))
    else:
        _out(cancel_call(args.target, args.after))
    return 0


if __name__ == "__main__":
    sys.exit(main())
