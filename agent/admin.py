"""The agent's admin endpoint: JSON over HTTP on a unix socket that only root
on the node can reach (pods have their own netns and mount namespace).
`nodemesh status|workloads|connections` read it."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from agent.daemon import Agent


def build_app(agent: Agent) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def readyz(_: web.Request) -> web.Response:
        ok = agent.ready
        return web.json_response({"ready": ok}, status=200 if ok else 503)

    async def status(_: web.Request) -> web.Response:
        # bpftool is a subprocess: never run it on the proxy's event loop.
        kernel = await asyncio.get_running_loop().run_in_executor(None, agent.bpf.kernel_view)
        return web.json_response(agent.status(kernel))

    async def workloads(_: web.Request) -> web.Response:
        return web.json_response(agent.enroller.rows())

    async def connections(_: web.Request) -> web.Response:
        return web.json_response(agent.flows.snapshot())

    async def config_dump(_: web.Request) -> web.Response:
        return web.json_response(agent.xds.dump())

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status)
    app.router.add_get("/workloads", workloads)
    app.router.add_get("/connections", connections)
    app.router.add_get("/config_dump", config_dump)
    return app


async def start(agent: Agent, path: Path) -> web.AppRunner:
    runner = web.AppRunner(build_app(agent), access_log=None)
    await runner.setup()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    site = web.UnixSite(runner, str(path))
    await site.start()
    os.chmod(path, 0o600)
    return runner
