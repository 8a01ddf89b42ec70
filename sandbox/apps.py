"""Small real servers and clients that run inside sandbox pods:
``python -m sandbox.apps <app> ...``. Each prints JSON lines on stdout so that
the tests and the demo can read what happened on the wire.

  whoami   TCP server: answers each connection with one JSON line naming
           itself and the peer address it sees, then waits for the client.
  echo     TCP server: echoes bytes; after the client's EOF it still answers
           with a trailer ``bye <n>`` (n = bytes received), then closes.
  hold     client: opens N connections one by one, reads each greeting,
           prints them, keeps all open until stdin closes.
  flood    client: F concurrent flows through echo, S bytes each, verifies
           the echoed bytes by SHA-256 and the trailer.
  probe    client: one connect + exchange, reports ok or the error and time.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import socket
import sys
import time


def _addr(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    return host, int(port)


def _out(obj: object) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def whoami(args: argparse.Namespace) -> None:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        peer = w.get_extra_info("peername")
        w.write((json.dumps({"server": args.name, "peer": f"{peer[0]}:{peer[1]}"}) + "\n").encode())
        await w.drain()
        try:
            await r.read()  # until the client closes
        except ConnectionError:
            pass
        w.close()

    server = await asyncio.start_server(handle, "0.0.0.0", args.port, backlog=1024)
    _out({"listening": args.port, "server": args.name})
    async with server:
        await server.serve_forever()


async def echo(args: argparse.Namespace) -> None:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        n = 0
        try:
            while chunk := await r.read(65536):
                n += len(chunk)
                w.write(chunk)
                await w.drain()
            w.write(f"bye {n}\n".encode())  # only after EOF: proves the half-close
            await w.drain()
        except ConnectionError:
            pass
        w.close()

    server = await asyncio.start_server(handle, "0.0.0.0", args.port, backlog=1024)
    _out({"listening": args.port})
    async with server:
        await server.serve_forever()


async def hold(args: argparse.Namespace) -> None:
    host, port = _addr(args.target)
    conns = []
    results = []
    for _ in range(args.count):
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection(host, port), args.timeout)
            line = await asyncio.wait_for(r.readline(), args.timeout)
            local = w.get_extra_info("sockname")
            results.append({"ok": bool(line), "local": f"{local[0]}:{local[1]}",
                            **(json.loads(line) if line else {})})
            conns.append(w)
        except (TimeoutError, OSError) as exc:
            results.append({"ok": False, "error": type(exc).__name__, "detail": str(exc)})
    _out({"results": results})
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for w in conns:
        w.close()


async def _one_flow(host: str, port: int, size: int, seed: int) -> dict[str, object]:
    r, w = await asyncio.open_connection(host, port)
    payload_hash = hashlib.sha256()
    back_hash = hashlib.sha256()
    received = bytearray()

    async def send() -> None:
        left = size
        while left:
            chunk = os.urandom(min(256 * 1024, left))
            payload_hash.update(chunk)
            w.write(chunk)
            await w.drain()
            left -= len(chunk)
        w.write_eof()  # half-close: we are done talking, not listening

    async def recv() -> None:
        got = 0
        while True:
            chunk = await r.read(262144)
            if not chunk:
                break
            if got + len(chunk) <= size:
                back_hash.update(chunk)
            else:
                back_hash.update(chunk[: max(0, size - got)])
                received.extend(chunk[max(0, size - got):])
            got += len(chunk)

    await asyncio.gather(send(), recv())
    w.close()
    trailer = bytes(received).decode(errors="replace")
    return {"seed": seed, "match": payload_hash.digest() == back_hash.digest(),
            "trailer": trailer.strip(), "trailer_ok": trailer == f"bye {size}\n"}


async def flood(args: argparse.Namespace) -> None:
    host, port = _addr(args.target)
    t0 = time.monotonic()
    results = await asyncio.gather(*(_one_flow(host, port, args.size, i) for i in range(args.flows)),
                                   return_exceptions=True)
    out = []
    for res in results:
        if isinstance(res, BaseException):
            out.append({"match": False, "error": repr(res)})
        else:
            out.append(res)
    _out({"flows": out, "seconds": round(time.monotonic() - t0, 3)})


def probe(args: argparse.Namespace) -> None:
    host, port = _addr(args.target)
    t0 = time.monotonic()
    family = socket.AF_INET6 if args.v4mapped else socket.AF_INET
    if args.v4mapped:
        host = f"::ffff:{host}"  # how a dual-stack client reaches an IPv4 address
    s = socket.socket(family, socket.SOCK_DGRAM if args.udp else socket.SOCK_STREAM)
    s.settimeout(args.timeout)
    if args.mark is not None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, args.mark)
    try:
        s.connect((host, port))
        if args.udp:
            res = {"ok": True, "data": ""}  # a UDP connect only routes; that is the test
        else:
            s.sendall(b"ping\n")
            data = s.recv(4096)
            res = {"ok": bool(data), "data": data.decode(errors="replace")}
            if not data:
                res["error"] = "closed"
    except OSError as exc:
        res = {"ok": False, "error": exc.strerror or type(exc).__name__, "errno": exc.errno}
    finally:
        s.close()
    res["seconds"] = round(time.monotonic() - t0, 4)
    _out(res)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m sandbox.apps", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="app", required=True)
    a = sub.add_parser("whoami")
    a.add_argument("--port", type=int, required=True)
    a.add_argument("--name", required=True)
    a = sub.add_parser("echo")
    a.add_argument("--port", type=int, required=True)
    a = sub.add_parser("hold")
    a.add_argument("--target", required=True)
    a.add_argument("--count", type=int, default=1)
    a.add_argument("--timeout", type=float, default=5.0)
    a = sub.add_parser("flood")
    a.add_argument("--target", required=True)
    a.add_argument("--flows", type=int, default=8)
    a.add_argument("--size", type=int, default=1 << 20)
    a = sub.add_parser("probe")
    a.add_argument("--target", required=True)
    a.add_argument("--timeout", type=float, default=3.0)
    a.add_argument("--udp", action="store_true", help="a UDP socket instead of TCP")
    a.add_argument("--mark", type=lambda v: int(v, 0), help="SO_MARK to set on the socket")
    a.add_argument("--v4mapped", action="store_true",
                   help="a dual-stack AF_INET6 socket to ::ffff:<ip>, as grpcio and Java connect")
    args = p.parse_args(argv)
    if args.app == "probe":
        probe(args)
        return
    fn = {"whoami": whoami, "echo": echo, "hold": hold, "flood": flood}[args.app]
    try:
        asyncio.run(fn(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
