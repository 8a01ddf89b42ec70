"""The CLI's side of the admin endpoint: HTTP/1.1 over the agent's unix socket."""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import Any

from nodemesh.errors import UserError


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(str(self._path))
        self.sock = sock


def get(path: Path, endpoint: str, timeout: float = 5.0) -> Any:
    if not path.exists():
        raise UserError(f"no agent admin socket at {path}: is 'nodemesh agent' running "
                        "with this --instance?")
    conn = _UnixHTTPConnection(path, timeout)
    try:
        conn.request("GET", endpoint)
        resp = conn.getresponse()
        body = resp.read()
    except PermissionError:
        raise UserError(f"permission denied on {path}: run as root") from None
    except (ConnectionRefusedError, FileNotFoundError):
        raise UserError(f"the agent at {path} is not answering: it may have crashed "
                        "(see 'nodemesh uninstall --help')") from None
    except (OSError, http.client.HTTPException) as exc:
        raise UserError(f"admin request {endpoint} to {path} failed: {exc}") from None
    finally:
        conn.close()
    try:
        return json.loads(body)
    except ValueError:
        raise UserError(f"the agent answered {endpoint} with something that is not JSON") from None
