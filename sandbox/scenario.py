"""The standard meshed node used by the demo and the tests: namespaces `shop`
(labelled for the mesh) and `legacy` (not), a client pod in each, a service
`web` with three endpoint pods answering "who am I, who are you", an `echo`
service for byte-exact transfers, and a running agent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sandbox.manifests import ManifestDir
from sandbox.node import Pod, Sandbox, stop_processes

NODE_NAME = "node-1"
WEB_VIP = "198.19.0.10"
WEB_PORT = 80
WEB_TARGET = 8080
# The whoami server speaks first (a greeting), so its port is declared TCP, as
# a server-first protocol must be: an HTTP port would wait for a request.
WEB_PORT_NAME = "tcp-web"
ECHO_VIP = "198.19.0.11"
ECHO_PORT = 7
ECHO_TARGET = 7007
CP_LISTEN = "127.0.0.1:15010"  # in the node netns
PY = sys.executable
NODEMESH = str(Path(sys.executable).with_name("nodemesh"))


class Scenario:
    def __init__(self, sandbox: Sandbox, agent_args: tuple[str, ...] = ()) -> None:
        self.sb = sandbox
        self.dir = sandbox.workdir / "manifests"
        self.manifests = ManifestDir(self.dir, NODE_NAME)
        self.instance = sandbox.agent_instance()
        self.agent: subprocess.Popen[str] | None = None
        self.control_plane: subprocess.Popen[str] | None = None
        self.agent_log = sandbox.workdir / "agent.log"
        self.agent_args = agent_args
        self.servers: dict[str, subprocess.Popen[str]] = {}
        self.shop_client: Pod
        self.legacy_client: Pod
        self.optout: Pod
        self.webs: list[Pod] = []
        self.echo: Pod

    # -- building -------------------------------------------------------------
    def build(self) -> Scenario:
        sb, m = self.sb, self.manifests
        m.namespace("shop", mesh=True)
        m.namespace("legacy", mesh=False)
        self.shop_client = sb.add_pod("client", "shop")
        self.legacy_client = sb.add_pod("client", "legacy")
        self.optout = sb.add_pod("batch", "shop", {"nodemesh.io/mesh": "disabled"})
        self.webs = [sb.add_pod(f"web-{i}", "shop", {"app": "web"}) for i in range(3)]
        self.echo = sb.add_pod("echo", "shop", {"app": "echo"})
        for p in (self.shop_client, self.legacy_client, self.optout, *self.webs, self.echo):
            m.pod(p)
        for w in self.webs:
            self.start_server(w, ["whoami", "--port", str(WEB_TARGET), "--name", w.name])
        self.start_server(self.echo, ["echo", "--port", str(ECHO_TARGET)])
        m.service("shop", "web", WEB_VIP, [(WEB_PORT_NAME, WEB_PORT, WEB_TARGET)])
        self.write_web_endpoints(self.webs)
        m.service("shop", "echo", ECHO_VIP, [("tcp-echo", ECHO_PORT, ECHO_TARGET)])
        m.endpoint_slice("shop", "echo", [self.echo], [("tcp-echo", ECHO_TARGET)])
        return self

    def write_web_endpoints(self, pods: list[Pod]) -> None:
        self.manifests.endpoint_slice("shop", "web", pods, [(WEB_PORT_NAME, WEB_TARGET)])

    def start_server(self, pod: Pod, app_args: list[str]) -> subprocess.Popen[str]:
        proc = pod.spawn([PY, "-m", "sandbox.apps", *app_args], stdout=subprocess.PIPE, text=True)
        line = proc.stdout.readline() if proc.stdout else ""
        if not line:
            raise RuntimeError(f"server {app_args} in {pod.key} did not start")
        self.servers[pod.key] = proc
        return proc

    def stop_server(self, pod: Pod) -> None:
        proc = self.servers.pop(pod.key)
        stop_processes([proc])

    # -- an external control plane (the agent embeds one unless told otherwise) -----
    def start_control_plane(self, listen: str = CP_LISTEN, config_dir: Path | None = None) -> None:
        """`nodemesh control-plane` in the node netns, where the agent runs."""
        assert self.sb.node is not None
        log = open(self.sb.workdir / "control-plane.log", "a")
        self.control_plane = self.sb.node.spawn(
            [NODEMESH, "control-plane", "--config-dir", str(config_dir or self.dir),
             "--listen", listen], stdout=log, stderr=subprocess.STDOUT, text=True)
        log.close()

    def stop_control_plane(self) -> int | None:
        if self.control_plane is None:
            return None
        stop_processes([self.control_plane])
        rc = self.control_plane.returncode
        self.control_plane = None
        return rc

    def control_plane_log(self) -> str:
        try:
            return (self.sb.workdir / "control-plane.log").read_text()
        except OSError:
            return ""

    # -- the agent --------------------------------------------------------------
    def agent_argv(self) -> list[str]:
        return [NODEMESH, "agent", "--instance", self.instance, "--node-name", NODE_NAME,
                "--config-dir", str(self.dir), "--cgroup-root", str(self.sb.pods_cgroup),
                *self.agent_args]

    def start_agent(self, timeout: float = 30, wait_ready: bool = True) -> None:
        assert self.sb.node is not None
        log = open(self.agent_log, "a")
        self.agent = self.sb.node.spawn(self.agent_argv(), stdout=log, stderr=subprocess.STDOUT,
                                        text=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.agent.poll() is not None:
                raise RuntimeError(f"agent exited with {self.agent.returncode}:\n{self.log_text()}")
            res = self.cli("status", "-o", "json", check=False)
            if res.returncode == 0 and (json.loads(res.stdout).get("ready") or not wait_ready):
                return
            time.sleep(0.1)
        raise RuntimeError(f"agent not ready after {timeout}s:\n{self.log_text()}")

    def stop_agent(self) -> int | None:
        if self.agent is None:
            return None
        stop_processes([self.agent], grace=15)
        return self.agent.returncode

    def log_text(self) -> str:
        try:
            return self.agent_log.read_text()
        except OSError:
            return ""

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, NODEMESH_INSTANCE=self.instance)
        res = subprocess.run([NODEMESH, *args], capture_output=True, text=True, env=env,
                             timeout=30, check=False)
        if check and res.returncode != 0:
            raise RuntimeError(f"nodemesh {' '.join(args)} failed: {res.stderr}")
        return res

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "-o", "json").stdout)

    def counter(self, program: str, name: str) -> int:
        return int(self.cli_json("status")["counters"][program][name])

    def wait_for(self, predicate: Any, timeout: float = 10, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")

    # -- clients --------------------------------------------------------------
    def app(self, pod: Pod, *args: str, timeout: float = 120) -> dict[str, Any]:
        res = pod.run([PY, "-m", "sandbox.apps", *args], timeout=timeout)
        if res.returncode != 0:
            raise RuntimeError(f"sandbox.apps {args} in {pod.key} failed: {res.stderr}")
        return json.loads(res.stdout.strip().splitlines()[-1])

    def hold(self, pod: Pod, target: str, count: int) -> tuple[subprocess.Popen[str], dict[str, Any]]:
        """Open ``count`` connections and keep them open until the returned
        process's stdin is closed."""
        proc = pod.spawn([PY, "-m", "sandbox.apps", "hold", "--target", target,
                          "--count", str(count)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"hold client in {pod.key} printed nothing")
        return proc, json.loads(line)

    @staticmethod
    def release(proc: subprocess.Popen[str]) -> None:
        if proc.stdin:
            proc.stdin.close()
        proc.wait(15)
