"""gRPC programs that run inside sandbox pods, for the proxyless-gRPC test:
``python -m sandbox.grpc_apps <app> ...``; each prints JSON lines on stdout.

  server   a gRPC server with one unary method (raw bytes, no generated
           code): answers with its name and the peer it sees.
  client   calls that method N times on a target, typically
           ``xds:///<service>.<namespace>.svc.cluster.local:<port>`` with
           GRPC_XDS_BOOTSTRAP naming a bootstrap file, so grpcio's own xDS
           resolver and balancer pick the endpoint; reports who answered.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent import futures
from typing import Any

import grpc

SERVICE = "nodemesh.sandbox.Hello"
METHOD = f"/{SERVICE}/Hello"


def _out(obj: object) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def server(args: argparse.Namespace) -> None:
    def hello(request: bytes, context: grpc.ServicerContext) -> bytes:
        return json.dumps({"server": args.name, "peer": context.peer(),
                           "request": request.decode(errors="replace")}).encode()

    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "Hello": grpc.unary_unary_rpc_method_handler(hello)})  # bytes in, bytes out
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=(handler,),
                      options=(("grpc.so_reuseport", 0),))
    port = srv.add_insecure_port(f"0.0.0.0:{args.port}")
    srv.start()
    _out({"listening": port, "server": args.name})
    try:
        srv.wait_for_termination()
    except KeyboardInterrupt:
        pass


def client(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    results: list[dict[str, Any]] = []
    # Only the xDS control plane and the pod network are reachable: no proxies.
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
    args = p.parse_args(argv)
    if args.app == "server":
        server(args)
        return 0
    return client(args)


if __name__ == "__main__":
    sys.exit(main())
