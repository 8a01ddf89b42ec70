"""A real HTTP/1.1 server for sandbox pods (the standard library's, with
keep-alive): ``python -m sandbox.http_apps --port P --name N``.

  GET /...                 200, JSON {"server", "peer", "path", "method"}
  GET /status/<code>       that status
  GET /slow/<ms>           answers after <ms> milliseconds
  GET /flaky/<n>           503 on every n-th request this server gets, else 200
  GET /bytes/<n>           n bytes of body
  POST/PUT /echo           the request body back (streamed in 64 KiB reads)
  GET /random/<n>/<seed>   n deterministic pseudo-random bytes (streamed)
  POST /sink               reads the body, answers {"size", "sha256"} of it
  GET with Upgrade: websocket   101, then echoes raw bytes (a tunnel)
With --fail every GET answers 500 (a broken endpoint); with --flaky N every N-th 503.
It prints one JSON line when listening, then serves until killed.
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import json
import random
import sys
import threading
import time

FAIL_ALL = False  # --fail: every GET answers 500 (a broken endpoint, for outlier detection)
FLAKY = 0  # --flaky N: every N-th GET this server gets answers 503


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    server_name = "?"
    counter = 0
    lock = threading.Lock()

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        self.send_header("x-server", self.server_name)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _info(self) -> bytes:
        return json.dumps({"server": self.server_name, "peer": self.client_address[0],
                           "path": self.path, "method": self.command,
                           "x-request-id": self.headers.get("x-request-id"),
                           "traceparent": self.headers.get("traceparent")}).encode() + b"\n"

    def do_GET(self) -> None:
        if (self.headers.get("upgrade") or "").lower() == "websocket":
            self._tunnel()
            return
        if FAIL_ALL:
            self._send(500, self._info())
            return
        parts = self.path.split("?", 1)[0].strip("/").split("/")
        with Handler.lock:
            Handler.counter += 1
            n = Handler.counter
        if FLAKY and n % FLAKY == 0:
            self._send(503, self._info())
            return
        if parts[0] == "status" and len(parts) > 1:
            self._send(int(parts[1]), self._info())
        elif parts[0] == "slow" and len(parts) > 1:
            time.sleep(int(parts[1]) / 1000)
            self._send(200, self._info())
        elif parts[0] == "flaky" and len(parts) > 1:
            self._send(503 if n % int(parts[1]) == 0 else 200, self._info())
        elif parts[0] == "bytes" and len(parts) > 1:
            self._send(200, b"x" * int(parts[1]), "application/octet-stream")
        elif parts[0] == "random" and len(parts) > 2:
            size, rng = int(parts[1]), random.Random(int(parts[2]))
            self.send_response(200)
            self.send_header("content-length", str(size))
            self.send_header("x-server", self.server_name)
            self.end_headers()
            while size:
                chunk = rng.randbytes(min(1 << 20, size))
                self.wfile.write(chunk)
                size -= len(chunk)
        else:
            self._send(200, self._info())

    do_HEAD = do_GET

    def _tunnel(self) -> None:
        """Accept an Upgrade (101) and echo raw bytes until the client closes: enough
        of WebSocket to prove the proxy switches to a byte tunnel."""
        self.send_response(101)
        self.send_header("connection", "upgrade")
        self.send_header("upgrade", "websocket")
        self.send_header("x-server", self.server_name)
        self.end_headers()
        self.wfile.flush()
        while chunk := self.connection.recv(65536):
            self.connection.sendall(chunk)
        self.close_connection = True

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if self.path.startswith("/sink"):
            h, left = hashlib.sha256(), length
            while left:
                chunk = self.rfile.read(min(1 << 20, left))
                if not chunk:
                    break
                h.update(chunk)
                left -= len(chunk)
            self._send(200, json.dumps({"size": length - left, "sha256": h.hexdigest()}).encode())
            return
        self.send_response(200)
        self.send_header("content-length", str(length))
        self.send_header("x-server", self.server_name)
        self.end_headers()
        left = length
        while left:
            chunk = self.rfile.read(min(65536, left))
            if not chunk:
                break
            self.wfile.write(chunk)
            left -= len(chunk)

    do_PUT = do_POST


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m sandbox.http_apps", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--fail", action="store_true", help="answer every GET with 500")
    p.add_argument("--flaky", type=int, default=0, help="answer every N-th GET with 503")
    args = p.parse_args()
    global FAIL_ALL, FLAKY
    FAIL_ALL = args.fail
    FLAKY = args.flaky
    Handler.server_name = args.name
    server = http.server.ThreadingHTTPServer(("0.0.0.0", args.port), Handler)
    server.daemon_threads = True
    sys.stdout.write(json.dumps({"listening": args.port, "server": args.name}) + "\n")
    sys.stdout.flush()
    server.serve_forever()


if __name__ == "__main__":
    main()
